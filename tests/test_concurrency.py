"""Threads, forks and many batch sizes: the native worker pool and the executables' buffers.

Cases that used to hang run in a subprocess with a timeout, so that a hang fails the test
instead of blocking the suite.
"""
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn

SHAPE = (2, 10, 10)
BUILD = """
def build(width=4):
    return nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(width, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
"""
exec(BUILD)  # noqa: S102 - the same network here and in the subprocesses


def compile_net(backend, seed=1):
    return cc.compile(build(), input_shape=SHAPE, loss=nn.CrossEntropyLoss(), backend=backend, seed=seed,
                      optimizer=cc.optim.SGD(lr=0.05, momentum=0.9))


def inputs(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *SHAPE)).astype(np.float32), rng.integers(0, 5, n)


def run_python(code: str, timeout: float, **env) -> str:
    """``code`` in a fresh interpreter with two worker threads; a hang fails the test."""
    environment = dict(os.environ, CNNCOMPILE_THREADS="2", **env)
    script = "import numpy as np, cnncompile as cc\nfrom cnncompile import nn\n" + BUILD + textwrap.dedent(code)
    try:
        result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as hang:
        said = b"".join(part or b"" for part in (hang.stdout, hang.stderr)).decode(errors="replace")
        pytest.fail(f"no answer in {timeout} s (a thread waiting forever); output so far:\n{said[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_worker_that_starts_late_still_serves_the_first_phase():
    """A worker thread that enters its loop only after the first phase was published (delayed by
    a test hook) runs that phase: the first predict and train step finish and match one thread."""
    out = run_python("""
        x = np.random.default_rng(0).standard_normal((5, 2, 10, 10)).astype(np.float32)
        net = lambda: cc.compile(build(), input_shape=(2, 10, 10), loss=nn.CrossEntropyLoss(), backend="llvm",
                                 seed=1, optimizer=cc.optim.SGD(lr=0.1))
        model = net()
        assert model.executable.threads == 2
        first = model.predict(x)
        loss = model.train_step(x, np.arange(5))
        import os
        os.environ["CNNCOMPILE_THREADS"] = "1"
        alone = net()
        np.testing.assert_array_equal(first, alone.predict(x))
        assert loss == alone.train_step(x, np.arange(5))
        print("served")
    """, timeout=90, CNNCOMPILE_TEST_WORKER_START_DELAY="0.2")
    assert "served" in out


@pytest.mark.parametrize("call", ["predict", "train_step", "compile", "grads"])
def test_a_forked_child_computes_what_the_parent_does(call):
    """After a compile with two threads, a child forked by multiprocessing predicts, trains,
    compiles another network (it used to wait forever at the native barrier: the pool's thread
    was not copied) and compiles a phase on first use (the gradients alone), with results equal
    to the parent's."""
    out = run_python(f"""
        import multiprocessing
        call = {call!r}
        x = np.random.default_rng(0).standard_normal((7, 2, 10, 10)).astype(np.float32)
        y = np.arange(7) % 5
        def make(width):
            return cc.compile(build(width), input_shape=(2, 10, 10), loss=nn.CrossEntropyLoss(), backend="llvm",
                              seed=1, optimizer=cc.optim.SGD(lr=0.1, momentum=0.9))
        model = make(4)
        model.train_step(x, y)  # the pool has run phases before the fork

        def work(m):
            if call == "predict":
                return m.predict(x), {{}}
            if call == "train_step":
                loss = m.train_step(x, y)
                return np.array(loss), m.state_dict()
            if call == "grads":
                loss, grads = m.loss_and_grads(x, y)
                return np.array(loss), grads
            other = make(3)  # a network this process has not compiled yet
            return other.predict(x), {{}}

        def child(queue):
            queue.put(work(model))

        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        try:
            got, state = queue.get(timeout=60)
            process.join(30)
        finally:
            if process.is_alive():  # (a hung child would keep this process from exiting)
                process.kill()
        assert process.exitcode == 0, process.exitcode
        want, parent_state = work(model)
        np.testing.assert_array_equal(got, want)
        for k, v in parent_state.items():
            np.testing.assert_array_equal(state[k], v, err_msg=k)
        print("same")
    """, timeout=150)
    assert "same" in out


def concurrently(model, calls: list, rounds: int) -> list:
    """Each of ``calls`` (functions of the model) ``rounds`` times, one thread per call, started together."""
    results = [[] for _ in calls]
    start = threading.Barrier(len(calls))

    def loop(k):
        start.wait()
        for _ in range(rounds):
            results[k].append(calls[k](model))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def assert_all_equal(results, expected):
    for k, (got, want) in enumerate(zip(results, expected)):
        wrong = 0
        for value in got:
            flat_got = value if isinstance(value, tuple) else (value,)
            flat_want = want if isinstance(want, tuple) else (want,)
            wrong += not all(np.array_equal(g, w) for g, w in zip(flat_got, flat_want))
        assert wrong == 0, f"thread {k}: {wrong} of {len(got)} results differ from the same call made alone"


@pytest.mark.parametrize("backend", ["llvm", "numpy"])
def test_one_model_used_from_two_threads_gives_each_its_own_answer(backend):
    """Two threads calling predict, loss_and_grads, evaluate and train_step on one model with
    different inputs get exactly the answers the same calls give one at a time (the calls are
    serialized from copying inputs in to copying outputs out, and the arrays handed out are copies)."""
    model = compile_net(backend)
    model.optimizer.lr = 0.0  # (a runtime value) a train step changes no weight, so its answer is fixed
    x, y = inputs()
    rounds = 60 if backend == "llvm" else 12

    def grads(sign):
        def call(m):
            loss, g = m.loss_and_grads(sign * x, y)
            return (np.array(loss), *g.values())
        return call

    def step(sign):
        def call(m):
            loss, outputs = m._train_step(sign * x, y)
            return (np.array(loss), *outputs)
        return call

    families = {
        "predict": [lambda m: m.predict(x), lambda m: m.predict(-x)],
        "loss_and_grads": [grads(1), grads(-1)],
        "evaluate": [lambda m: m.evaluate(x, y, batch_size=4)["loss"], lambda m: m.evaluate(-x, y)["loss"]],
        "train_step": [step(1), step(-1)],
    }
    for name, calls in families.items():
        expected = [call(model) for call in calls]
        results = concurrently(model, calls, rounds)
        assert_all_equal(results, expected)
    mixed = [families["predict"][0], families["loss_and_grads"][1], families["train_step"][0]]
    assert_all_equal(concurrently(model, mixed, rounds), [call(model) for call in mixed])


def test_returned_arrays_are_not_the_models_buffers():
    """What predict and the step hand out stays as it was after later calls."""
    model = compile_net("llvm")
    x, y = inputs()
    first = model.predict(x)
    kept = first.copy()
    _, outputs = model._train_step(x, y)
    kept_outputs = outputs[0].copy()
    model.predict(-x)
    model.train_step(-x, y)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(outputs[0], kept_outputs)


def array_bytes_traced() -> int:
    """Bytes of NumPy array data allocated since tracemalloc started and still alive."""
    domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    return sum(t.size for t in tracemalloc.take_snapshot().filter_traces([domain]).traces)


@pytest.mark.parametrize("backend, sizes", [("llvm", 60), ("numpy", 12)])
def test_memory_kept_is_bounded_over_many_batch_sizes(backend, sizes):
    """Predicting with every batch size from 1 up keeps working memory for a few batches, not for
    every size (array memory traced by tracemalloc, and memory_report), and each size's results
    equal the rows of one prediction of the whole batch."""
    model = compile_net(backend)
    x, _ = inputs(sizes)
    whole = model.predict(x)
    largest = model.memory_report(sizes)["work_bytes_unshared" if backend == "numpy" else "work_bytes"]
    tracemalloc.start()
    try:
        for n in range(1, sizes + 1):
            part = model.predict(x[:n])
            if backend == "llvm":
                np.testing.assert_array_equal(part, whole[:n], err_msg=f"batch {n}")
            else:  # NumPy's einsum may sum in another order for another batch size
                np.testing.assert_allclose(part, whole[:n], rtol=1e-5, atol=1e-6, err_msg=f"batch {n}")
            del part
        held = array_bytes_traced()
    finally:
        tracemalloc.stop()
    assert held < 4 * largest, f"{held} bytes of arrays held after {sizes} batch sizes (one of {sizes}: {largest})"
    report = model.memory_report(sizes)
    if backend == "llvm":
        assert report["kept_arenas"] == 1 and report["kept_bytes"] == largest
        assert len(report["kept_batch_sizes"]) <= 8
    else:
        assert report["kept_arenas"] <= 4 and report["kept_bytes"] <= 4 * largest
    np.testing.assert_array_equal(model.predict(x), whole)  # the largest again, after all the others


def test_training_runs_smaller_batches_inside_the_largest_arena():
    """Train steps alternating batch sizes in one arena end exactly where a model that saw each
    batch size in its own fresh arena ends."""
    x, y = inputs(24)
    sizes = [24, 5, 17, 2, 24, 9]
    shared, fresh = compile_net("llvm"), compile_net("llvm")
    for n in sizes:
        shared.train_step(x[:n], y[:n])
    assert shared.memory_report(24)["kept_arenas"] == 1
    for n in sizes:
        fresh.executable.arenas.clear()  # each step in a new arena of its batch's size
        fresh.executable.bound.clear()
        fresh.train_step(x[:n], y[:n])
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(shared.state_dict()[k], v, err_msg=k)


def test_two_models_compiling_the_same_phase_at_once_from_two_threads():
    """Two models of one network share their code; asked for the gradients (a phase compiled on
    first use) from two threads at the same moment, the phase is compiled once and both get the
    answer a third model, asked alone afterwards, gets."""
    models = [cc.compile(build(7), input_shape=SHAPE, loss=nn.CrossEntropyLoss(), backend="llvm", seed=3,
                         optimizer=cc.optim.SGD(lr=0.05)) for _ in range(3)]  # (a network no other test compiles)
    code = models[0].executable.code
    assert all(m.executable.code is code for m in models) and "grads" not in code.facts
    x, y = inputs()
    start, results = threading.Barrier(2), [None, None]

    def ask(k):
        start.wait()
        results[k] = models[k].loss_and_grads(x, y)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    parts = len(code.parts)
    loss, grads = models[2].loss_and_grads(x, y)
    assert len(code.parts) == parts  # (compiled once, by one of the threads)
    for got_loss, got in results:
        assert got_loss == loss
        for k in grads:
            np.testing.assert_array_equal(got[k], grads[k], err_msg=k)

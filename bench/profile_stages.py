"""Where a train step's time goes: every kernel of the train phase run alone (LLVM backend), medians.

Summing stages also get GFLOP/s (bench/flops.py) and their share of the machine's sgemm ceiling
(bench/sgemm.py, or ``--ceiling``). A kernel run alone pays a fixed call overhead (Python, ctypes,
waking the worker threads), taken as the cheapest kernel's time and subtracted before GFLOP/s.

    python bench/profile_stages.py examples/lenet5.py [--batch 64] [--top 20] [--ceiling GFLOPS]
"""
from __future__ import annotations

import argparse
import runpy
import statistics
import time

import numpy as np

import cnncompile as cc
from flops import stage_flops, train_flops
from sgemm import sgemm_ceiling


def kernel_times(model, batch: int, repeats: int) -> list[tuple[float, int, list]]:
    """Median time of each kernel of the train phase run alone (a stage and the stages fused
    into its epilogue), on the buffers of a step just taken."""
    exe, phase = model.executable, "train"
    scalars = model.optimizer.scalars(model.step + 1)
    out = []
    for j, stages in enumerate(exe.units(phase)):
        exe.run_unit(phase, j, batch, scalars)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            exe.run_unit(phase, j, batch, scalars)
            samples.append(time.perf_counter() - t0)
        out.append((statistics.median(samples), j, stages))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ceiling", type=float, default=None, help="sgemm GFLOP/s (skips measuring it)")
    args = parser.parse_args()
    spec = runpy.run_path(args.file)
    batch = args.batch or spec.get("batch_size", 64)
    model = cc.compile(spec["net"], input_shape=spec["input_shape"], loss=spec.get("loss"),
                       optimizer=spec.get("optimizer") or cc.optim.SGD(lr=0.01, momentum=0.9), backend="llvm")
    rng = np.random.default_rng(0)
    x = rng.random((batch, *spec["input_shape"]), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    model.train_step(x, y)
    step = statistics.median(timed_steps(model, x, y, args.repeats))
    times = kernel_times(model, batch, args.repeats)
    ceiling = args.ceiling or sgemm_ceiling(model.executable.threads)
    total = sum(t for t, _, _ in times)
    overhead = min(t for t, _, _ in times)
    step_gflops = train_flops(model) * batch / step / 1e9
    print(f"train step {step * 1e3:.2f} ms = {step_gflops:.1f} GFLOP/s (conv/linear work, bench/flops.py), "
          f"{100 * step_gflops / ceiling:.1f}% of the sgemm ceiling {ceiling:.1f} GFLOP/s "
          f"({model.executable.threads} threads)")
    print(f"kernels run alone sum to {total * 1e3:.2f} ms ({len(times)} kernels, one call each); "
          f"GFLOP/s after subtracting a call's overhead, {overhead * 1e3:.3f} ms (the cheapest kernel)")
    for t, j, stages in sorted(times, key=lambda r: -r[0])[:args.top]:
        s, fused = stages[0], len(stages) - 1
        print(f"{t * 1e3:8.3f} ms {100 * t / total:5.1f}% {rate(stage_flops(s, batch), t, overhead, ceiling)}  "
              f"#{j:<3d} {s.role:8s} {s.layer:14s} {s.out:22s} {'wrt ' + s.wrt if s.wrt else ''}"
              f"{f' (+{fused} fused)' if fused else ''}")


def rate(flops, seconds, overhead, ceiling) -> str:
    """GFLOP/s and share of the ceiling, the call overhead taken off; blank where the FLOPs are
    unknown or under a fifth of the call is left, which the overhead's own noise would swamp."""
    work = seconds - overhead
    if flops is None or work < seconds / 5:
        return " " * 21
    gflops = flops / work / 1e9
    return f"{gflops:7.1f} GFLOP/s {100 * gflops / ceiling:4.0f}%"


def timed_steps(model, x, y, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.train_step(x, y)
        out.append(time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    main()

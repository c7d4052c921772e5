"""Training throughput of the example networks against PyTorch eager and torch.compile, interleaved
in one process, medians of several rounds: ResNet-20 (batch 32), the MobileNet-style net, the small
DenseNet, AlexNet (batch 8), and LeNet-5 (batch 64). Each network file is built once per library.

Per net: images/s of each, cnncompile's speed-up over each, cnncompile's training GFLOP/s (see
bench/flops.py for what is counted) and its share of this machine's sgemm ceiling (bench/sgemm.py,
measured once at the start), and memory. Compile times are printed apart and not timed.

    python bench/zoo.py [--nets resnet20 mobilenet] [--rounds 5] [--steps 5] [--no-compile]
"""
from __future__ import annotations

import argparse
import resource
import runpy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import cnncompile as cc
from flops import train_flops
from sgemm import sgemm_ceiling

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NETS = {"lenet5": 64, "resnet20": 32, "mobilenet": 32, "densenet": 32, "alexnet": 8}
THREADS = 2
MiB = 2 ** 20


def torch_net(name):
    """The example file run with ``torch.nn`` in place of ``cnncompile.nn`` (same names, same layers)."""
    src = (EXAMPLES / f"{name}.py").read_text()
    src = src.replace("from cnncompile import nn, optim", "import torch.nn as nn\nfrom cnncompile import optim")
    src = src.replace("import cnncompile as cc\n", "import torch as cc\n")  # cc.cat → torch.cat
    namespace = {"__file__": str(EXAMPLES / f"{name}.py"), "__name__": "bench_torch"}
    exec(compile(src, f"{name}.py", "exec"), namespace)
    return namespace["net"]


def torch_step(name, model, tx, ty, compiled=False):
    """One SGD step of a fresh PyTorch copy of the net, from cnncompile's initial weights, with its own
    optimizer; through torch.compile (compiled lazily, at the first call) if ``compiled``."""
    net = torch_net(name)
    net.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(net) if compiled else net

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(forward(tx), ty).backward()
        opt.step()
    return step


def compiled_step(name, model, tx, ty):
    """torch.compile's step, already compiled (its first call), and the seconds that took;
    or None and the first line of the exception where torch.compile fails here."""
    try:
        step = torch_step(name, model, tx, ty, compiled=True)
        started = time.perf_counter()
        step()
        return step, time.perf_counter() - started
    except Exception as e:  # a benchmark column, not a test: report and go on
        return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def timed(fn, steps):
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def memory(model, batch) -> str:
    """cnncompile's own bytes for this batch (the buffer plan: shared and unshared), and the
    process's peak RSS so far, which holds every library's tensors."""
    r = model.memory_report(batch)
    own = (f"state {r['state_bytes'] / MiB:.1f} MiB + work {r['work_bytes'] / MiB:.1f} MiB "
           f"({r['work_bytes_unshared'] / MiB:.1f} MiB unshared)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # Linux: KiB
    return f"memory {own}; process peak RSS {peak:,.0f} MiB"


def bench_net(name, args, ceiling):
    batch = NETS[name]
    spec = runpy.run_path(str(EXAMPLES / f"{name}.py"))
    started = time.perf_counter()
    model = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"])
    compile_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *spec["input_shape"])).astype(np.float32)
    y = rng.integers(0, model.predict(x[:1]).shape[1], batch)
    tx, ty = torch.tensor(x), torch.tensor(y)
    runs = {"cnncompile": lambda: model.train_step(x, y), "eager": torch_step(name, model, tx, ty)}
    compiled, tc_compile = compiled_step(name, model, tx, ty) if not args.no_compile else (None, "skipped")
    if compiled:
        runs["torch.compile"] = compiled
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, fn in runs.items():
            times[k].append(timed(fn, args.steps))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name:10s} batch {batch:3d}: cnncompile {batch / t['cnncompile']:8,.0f} img/s | "
          f"eager {batch / t['eager']:8,.0f} img/s, cnncompile ×{t['eager'] / t['cnncompile']:.2f} | "
          + (f"torch.compile {batch / t['torch.compile']:8,.0f} img/s, "
             f"cnncompile ×{t['torch.compile'] / t['cnncompile']:.2f}" if compiled else f"torch.compile {tc_compile}"))
    gflops = train_flops(model) * batch / t["cnncompile"] / 1e9
    print(f"{'':10s} cnncompile {gflops:.1f} GFLOP/s = {100 * gflops / ceiling:.1f}% of sgemm; {memory(model, batch)}")
    print(f"{'':10s} compile: cnncompile {compile_s:.1f}s"
          + (f", torch.compile {tc_compile:.1f}s (first step; inductor's disk cache may keep it from an "
             f"earlier run)" if compiled else ""), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", nargs="+", default=list(NETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ceiling = sgemm_ceiling(THREADS)
    print(f"sgemm ceiling on {THREADS} threads: {ceiling:.1f} GFLOP/s; medians of {args.rounds} rounds "
          f"of {args.steps} steps; ×: cnncompile's speed-up", flush=True)
    for name in args.nets:
        bench_net(name, args, ceiling)


if __name__ == "__main__":
    main()

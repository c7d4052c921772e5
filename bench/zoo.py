"""Training throughput of the example networks against PyTorch eager, interleaved in one process,
medians of several rounds: ResNet-20 (batch 32), the MobileNet-style net, the small DenseNet,
AlexNet (batch 8), and LeNet-5 (batch 64). Each network file is built once per library.

    python bench/zoo.py [--nets resnet20 mobilenet] [--rounds 5] [--steps 5]
"""
from __future__ import annotations

import argparse
import runpy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import cnncompile as cc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NETS = {"lenet5": 64, "resnet20": 32, "mobilenet": 32, "densenet": 32, "alexnet": 8}


def torch_net(name):
    """The example file run with ``torch.nn`` in place of ``cnncompile.nn`` (same names, same layers)."""
    src = (EXAMPLES / f"{name}.py").read_text()
    src = src.replace("from cnncompile import nn, optim", "import torch.nn as nn\nfrom cnncompile import optim")
    src = src.replace("import cnncompile as cc\n", "import torch as cc\n")  # cc.cat → torch.cat
    namespace = {"__file__": str(EXAMPLES / f"{name}.py"), "__name__": "bench_torch"}
    exec(compile(src, f"{name}.py", "exec"), namespace)
    return namespace["net"]


def timed(fn, steps):
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", nargs="+", default=list(NETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.nets:
        batch = NETS[name]
        spec = runpy.run_path(str(EXAMPLES / f"{name}.py"))
        started = time.perf_counter()
        model = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"])
        compile_s = time.perf_counter() - started
        ref = torch_net(name)
        ref.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
        ref.train()
        opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *spec["input_shape"])).astype(np.float32)
        classes = model.predict(x[:1]).shape[1]
        y = rng.integers(0, classes, batch)
        tx, ty = torch.tensor(x), torch.tensor(y)

        def torch_step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(tx), ty).backward()
            opt.step()

        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(timed(lambda: model.train_step(x, y), args.steps))
            theirs.append(timed(torch_step, args.steps))
        a, b = statistics.median(ours), statistics.median(theirs)
        planned = sum(arr.nbytes for arr in model.executable.bind(batch)[0].values()) / 2 ** 20
        print(f"{name:10s} batch {batch:3d}: cnncompile {batch / a:8,.0f} img/s, pytorch eager {batch / b:8,.0f} img/s, "
              f"ratio ×{b / a:.2f}  (compile {compile_s:.1f}s, buffers {planned:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()

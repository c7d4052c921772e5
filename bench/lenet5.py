"""LeNet-5 training and predict throughput: cnncompile (LLVM, NumPy) against PyTorch eager,
interleaved in one process, medians of several rounds, printed as ratios.

    python bench/lenet5.py [--rounds 5] [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import cnncompile as cc
from cnncompile import nn as cnn


def lenet5(nn):
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def timed(fn, steps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    import torch

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    started = time.perf_counter()
    models = {}
    for backend in ("llvm", "numpy"):
        t0 = time.perf_counter()
        models[backend] = cc.compile(lenet5(cnn), input_shape=(1, 32, 32), loss=cnn.CrossEntropyLoss(),
                                     optimizer=cc.optim.SGD(lr=0.01, momentum=0.9), backend=backend)
        print(f"compile {backend}: {time.perf_counter() - t0:.2f}s")
    ref = lenet5(torch.nn)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.tensor(x), torch.tensor(y)

    def torch_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(tx), ty).backward()
        opt.step()

    def torch_predict():
        with torch.no_grad():
            ref(tx)

    train = {"cnncompile-llvm": lambda: models["llvm"].train_step(x, y),
             "cnncompile-numpy": lambda: models["numpy"].train_step(x, y),
             "pytorch-eager": torch_step}
    predict = {"cnncompile-llvm": lambda: models["llvm"].predict(x, batch_size=args.batch),
               "cnncompile-numpy": lambda: models["numpy"].predict(x, batch_size=args.batch),
               "pytorch-eager": torch_predict}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}; "
          f"{args.rounds} rounds × {args.steps} steps, interleaved")
    for title, fns in (("train_step", train), ("predict", predict)):
        samples = {k: [] for k in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                samples[name].append(args.batch / timed(fn, args.steps))
        base = statistics.median(samples["pytorch-eager"])
        print(f"\n{title} (images/s, median of {args.rounds}):")
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"  {name:18s} {med:10,.0f}   ×{med / base:5.2f} vs PyTorch eager")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

"""The main job's recipe (LeNet-5 on MNIST padded to 32×32, SGD lr 0.05 momentum 0.9 weight decay
5e-4, step decay ×0.2 every 5 epochs, batch 64, 12 epochs) in PyTorch eager on the same data and
batch order: its wall time and test accuracy, to set beside `cnncompile train examples/lenet5.py`.

    python bench/lenet5_recipe.py [--epochs 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cnncompile.training.data import load_mnist, pad_images
from cnncompile.training.fit import batches


def lenet5(nn):
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = {k: (pad_images(v.images, 32), v.labels) for k, v in load_mnist(None).items()}
    net = lenet5(torch.nn)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.2)
    x, y = data["train"]
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        for xb, yb in batches(x, y, 64, 0, epoch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(yb))
            loss.backward()
            opt.step()
        sched.step()
        print(f"epoch {epoch}: {time.perf_counter() - t0:.1f}s, last loss {loss.item():.4f}", flush=True)
    wall = time.perf_counter() - started
    net.eval()
    with torch.no_grad():
        tx, ty = data["test"]
        acc = float((net(torch.from_numpy(tx)).argmax(1).numpy() == ty).mean())
    print(f"pytorch eager: test accuracy {acc:.4f} after {args.epochs} epochs, {wall:.0f}s of training")


if __name__ == "__main__":
    main()

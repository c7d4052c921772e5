"""One framework's train step of one example network, in a process of its own (thread pools of
several frameworks in one process starve each other), driven over stdin/stdout by bench/zoo.py.

    python bench/peers/worker.py FRAMEWORK NET STATE.npz [--check-steps 2]

FRAMEWORK: cnncompile (compiles the example, writes STATE.npz: its initial state_dict, the batch and
its SGD hyper-parameters), or cnncompile@TARGET, eager, torch.compile, jax, tinygrad, tinygrad@DEV (read STATE.npz).

Protocol, one JSON object a line: the worker first answers
``{"ok": true, "losses": [...], "compile_s": s, "info": ...}`` (the losses of its first
``--check-steps`` steps on the batch, for the caller to compare) or ``{"ok": false, "error": ...,
"missing": bool}``; then for each line ``time N`` it runs one step, then N steps, and answers
``{"seconds": per step, "peak_rss_mib": ...}``; ``quit`` or end of input ends it. What the
frameworks print goes to stderr, so stdout carries only the protocol.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # netdefs & co; bench/flops.py

FRAMEWORKS = ("cnncompile", "eager", "torch.compile", "jax", "tinygrad")
OPTIONAL = ("jax", "jaxlib", "tinygrad", "torch")  # a column says "not installed" when one is missing
THREADS = 2
MiB = 2 ** 20


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the parent's peak over fork
    and exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CnncompileTrainer:
    """The example compiled by cnncompile; writes the shared state for the other frameworks."""

    def __init__(self, name: str, state_path: str, batch: int, target: str | None = None):
        """``target`` None: the reference, which writes the shared state; a name (``cnncompile@avx512``):
        the same network compiled for that `Target`, loading the reference's state and batch."""
        import runpy

        import cnncompile as cc
        from flops import train_flops
        spec = runpy.run_path(str(HERE.parent.parent / "examples" / f"{name}.py"))
        started = time.perf_counter()
        self.model = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"],
                                target=target)
        self.compile_s = time.perf_counter() - started
        if target is None:
            x, y = draw_batch(self.model, spec["input_shape"], batch)
            export_state(state_path, self.model, x, y)
        else:
            state, x, y, _ = load_state(state_path)
            self.model.load_state_dict(state)
        self.set_batch(x, y)
        r = self.model.memory_report(batch)
        dropout = [n for n, m in spec["net"].named_modules() if type(m).__name__.startswith("Dropout") and m.p]
        self.info = {"train_flop": train_flops(self.model) * batch, "backend": self.model.executable.name,
                     "dropout": dropout,
                     "memory": f"state {r['state_bytes'] / MiB:.1f} MiB + work {r['work_bytes'] / MiB:.1f} MiB "
                               f"({r['work_bytes_unshared'] / MiB:.1f} MiB unshared)"}

    def set_batch(self, x, y):
        self.x, self.y = x, y

    def step(self):
        self.loss = self.model.train_step(self.x, self.y)
        return self.loss

    def sync(self) -> float:
        return float(self.loss)


def draw_batch(model, input_shape, batch: int, seed: int = 0):
    """Standard normal images and uniform labels over the model's classes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    return x, rng.integers(0, model.predict(x[:1]).shape[1], batch)


def export_state(path, model, x, y) -> None:
    """What the other frameworks start from: the compiled model's state_dict (before any step), the
    batch and the SGD hyper-parameters."""
    import numpy as np
    if type(model.optimizer).__name__ != "SGD":
        raise RuntimeError(f"the bench peers implement SGD only, the model uses {model.optimizer}")
    state = {f"state/{k}": v for k, v in model.state_dict().items()}
    np.savez(path, x=x, y=y, hyper=json.dumps(model.optimizer.hyper()), **state)


def load_state(path: str):
    import numpy as np
    with np.load(path) as f:
        state = {k[len("state/"):]: f[k] for k in f.files if k.startswith("state/")}
        return state, f["x"], f["y"], json.loads(str(f["hyper"]))


def build(framework: str, net: str, state_path: str, batch: int):
    """The trainer and what its compile time means; ImportError where the framework is missing.
    ``tinygrad@DEV``: tinygrad on device DEV (``CPU:CLANG``, ``CPU:LLVM``, ``CPU:X86``)."""
    if framework.split("@")[0] == "cnncompile":
        target = framework.partition("@")[2] or None
        trainer = CnncompileTrainer(net, state_path, batch, target)
        trainer.info["version"] = version("cnncompile") + f" for {trainer.model.executable.target.name}"
        return trainer, "cc.compile"
    state, x, y, hyper = load_state(state_path)
    if framework in ("eager", "torch.compile"):
        import torch
        torch.set_num_threads(THREADS)
        from torch_nets import TorchTrainer
        trainer = TorchTrainer(net, state, hyper, compiled=framework == "torch.compile")
        when, trainer.info = "first step", {"version": f"torch {torch.__version__}"}
    elif framework == "jax":
        import jax  # noqa: F401  (ImportError: not installed)
        from jax_nets import JaxTrainer
        trainer, when = JaxTrainer(net, state, hyper), "first step"
        trainer.info = {"version": f"jax {jax.__version__}"}
    elif framework.split("@")[0] == "tinygrad":
        from tinygrad_nets import choose_device
        device = choose_device(framework.partition("@")[2] or None)
        import tinygrad  # noqa: F401
        from tinygrad_nets import TinygradTrainer
        trainer, when = TinygradTrainer(net, state, hyper), "first 2 steps"
        trainer.info = {"version": f"tinygrad {version('tinygrad')} on {device}"}
    else:
        raise ValueError(f"unknown framework {framework!r}; one of {FRAMEWORKS}")
    trainer.set_batch(x, y)
    return trainer, when


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed(package)
    except PackageNotFoundError:
        return "?"


def first_steps(trainer, framework: str, steps: int):
    """The losses of the first ``steps`` steps and the compile time: cnncompile's cc.compile; the
    first step for the others (TinyJit: the first two, it captures on the second)."""
    losses, started = [], time.perf_counter()
    compile_s = getattr(trainer, "compile_s", None)
    for i in range(steps):
        trainer.step()
        losses.append(trainer.sync())
        if compile_s is None and i == (1 if framework.startswith("tinygrad") else 0):
            compile_s = time.perf_counter() - started
    return losses, compile_s


def timed(trainer, steps: int) -> float:
    trainer.step()
    trainer.sync()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    trainer.sync()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", help=f"one of {FRAMEWORKS}, or cnncompile@TARGET, tinygrad@DEV")
    parser.add_argument("net")
    parser.add_argument("state")
    parser.add_argument("--batch", type=int, default=32, help="cnncompile: the batch it draws and writes")
    parser.add_argument("--check-steps", type=int, default=2)
    args = parser.parse_args()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the frameworks' own prints go to stderr

    def say(**message):
        proto.write(json.dumps(message) + "\n")

    try:
        trainer, when = build(args.framework, args.net, args.state, args.batch)
        losses, compile_s = first_steps(trainer, args.framework, max(args.check_steps, 2))
    except ImportError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL:
            say(ok=False, missing=False, error=f"ImportError: {e}")
            raise
        say(ok=False, missing=True, error=f"not installed ({e.name})")
        return
    except Exception as e:  # a bench column, not a test: report it and let the caller go on
        say(ok=False, missing=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise
    say(ok=True, losses=losses[: args.check_steps], compile_s=compile_s, compile_what=when, info=trainer.info)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "time":
            say(seconds=timed(trainer, int(command[1])), peak_rss_mib=peak_rss_mib())
        else:
            say(error=f"unknown command {line.strip()!r}")


if __name__ == "__main__":
    main()

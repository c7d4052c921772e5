"""Checkpoints: everything needed to continue training exactly, in one atomically written file.

The file is an uncompressed NumPy ``.npz`` (a zip: every member carries a CRC, so truncation
or corruption is detected on reading) holding each parameter, buffer and optimizer state
array, and ``meta.json``: the format version, the network's signature (op kinds, names,
attributes, state shapes), its source text when it came from a network file, the compile
arguments, the optimizer's hyperparameters (its current learning rate included), the step,
epoch and random-draw counters, and the callbacks' states (schedules, early stopping).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT, VERSION = "cnncompile-checkpoint", 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another network."""


def signature(model) -> dict:
    """What must match for a checkpoint's arrays to mean the same thing in another process."""
    ops = [[n.name, n.kind, json.dumps(n.attrs, sort_keys=True, default=str)] for n in model.tracer.graph.ops]
    shapes = {n: list(model.executable.state[n].shape) for n in model.prog.state_names}
    digest = hashlib.sha256(json.dumps([ops, shapes], sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "state": shapes}


def _spec_of(value):
    """Losses and loss weights as JSON: a class name, or a list / dict of them."""
    if isinstance(value, dict):
        return {k: _spec_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_spec_of(v) for v in value]
    return type(value).__name__ if hasattr(value, "kind") else value


def _from_spec(spec):
    from cnncompile import nn
    if isinstance(spec, dict):
        return {k: _from_spec(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return tuple(_from_spec(v) for v in spec)
    return getattr(nn, spec)() if isinstance(spec, str) else spec


def save(model, path) -> None:
    path = Path(path)
    arrays = {f"state/{n}": model.executable.state[n] for n in model.prog.state_names}
    for name, spec in model.prog.tensors.items():
        if spec.role == "state":
            arrays[f"optim/{name}"] = model.executable.state[name]
    opt = model.optimizer
    meta = {
        "format": FORMAT, "version": VERSION, "signature": signature(model),
        "network": {"source": getattr(model, "source_text", None), "file": getattr(model, "source_file", None)},
        "compile": {"input_shape": list(model.input_shape), "loss": _spec_of(model.loss),
                    "loss_weights": _spec_of(model.loss_weights), "backend": model.executable.name,
                    "dtype": str(model.dtype), "seed": model.seed},
        "optimizer": None if opt is None else {"class": type(opt).__name__, "hyper": opt.hyper()},
        "counters": {"step": model.step, "epoch": model.epoch, "noise_seed": model.noise_seed,
                     "noise_draws": model.noise_draws, "batches_tracked": model.batches_tracked},
        "callbacks": [[type(cb).__name__, cb.state_dict()] for cb in model.callbacks],
        "history": model.history,
    }
    buffer = io.BytesIO()
    np.savez(buffer, **{"meta.json": np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the old file stays whole until the new one is complete
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint, every byte checked; errors say what is wrong."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({exc}); it cannot be loaded — use an "
                              f"earlier checkpoint") from None
    try:
        meta = json.loads(contents.pop("meta.json").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a cnncompile checkpoint (no readable meta.json)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnncompile checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}; this cnncompile reads {VERSION}")
    return meta, contents


def restore(model, meta: dict, arrays: dict, path) -> None:
    """Put a checkpoint's state into ``model``, after checking that it is the same network."""
    mine = signature(model)
    theirs = meta["signature"]
    if mine["digest"] != theirs["digest"]:
        diff = [f"{k}: checkpoint {theirs['state'].get(k)} vs model {v}" for k, v in mine["state"].items()
                if theirs["state"].get(k) != v]
        extra = sorted(set(theirs["state"]) - set(mine["state"]))
        detail = "; ".join(diff[:3] + ([f"keys only in the checkpoint: {extra[:3]}"] if extra else []))
        raise CheckpointError(f"checkpoint {path} was saved from a different network"
                              f"{' (' + detail + ')' if detail else ' (same shapes, different layers)'}; "
                              f"load it with the network that wrote it")
    state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
    model.load_state_dict(state, strict=True)
    for key, value in arrays.items():
        if key.startswith("optim/"):
            name = key[len("optim/"):]
            if name not in model.executable.state or model.executable.state[name].shape != value.shape:
                raise CheckpointError(f"checkpoint {path}: optimizer state {name} does not fit this model's "
                                      f"optimizer ({type(model.optimizer).__name__})")
            model.executable.state[name][...] = value
    if meta["optimizer"] is not None and model.optimizer is not None:
        model.optimizer.lr = float(meta["optimizer"]["hyper"]["lr"])
    c = meta["counters"]
    model.step, model.epoch, model.noise_seed = c["step"], c["epoch"], c["noise_seed"]
    model.noise_draws, model.batches_tracked = c["noise_draws"], c["batches_tracked"]
    model.pending_callback_states = meta.get("callbacks", [])
    model.history = meta.get("history", {})


def load(path, net=None, backend=None):
    """A compiled model that continues exactly where the checkpoint left off.

    ``net``: the network (an ``nn.Module``); needed unless the checkpoint holds its source
    (checkpoints written by the CLI do). ``backend``: default, the one that saved it.
    """
    import cnncompile as cc
    from cnncompile import optim
    meta, arrays = read(path)
    source = meta["network"].get("source")
    if net is None:
        if not source:
            raise CheckpointError(f"checkpoint {path} does not hold the network's source; pass net=... to cc.load")
        namespace: dict = {"__name__": "cnncompile_checkpoint_network",
                           "__file__": meta["network"].get("file") or "<checkpoint>"}
        exec(compile(source, namespace["__file__"], "exec"), namespace)  # noqa: S102 - the user's own file
        net = namespace["net"]
    comp = meta["compile"]
    optimizer = None
    if meta["optimizer"] is not None:
        optimizer = getattr(optim, meta["optimizer"]["class"])(**meta["optimizer"]["hyper"])
    model = cc.compile(net, input_shape=tuple(comp["input_shape"]), loss=_from_spec(comp["loss"]),
                       loss_weights=_from_spec(comp["loss_weights"]), optimizer=optimizer,
                       backend=backend or comp["backend"], dtype=comp["dtype"], seed=comp["seed"])
    model.source_text, model.source_file = source, meta["network"].get("file")
    restore(model, meta, arrays, path)
    return model

"""Checkpoints: everything needed to continue training exactly, in one atomically written file.

The file is an uncompressed zip that NumPy reads as an ``.npz``: one ``.npy`` member per
parameter, buffer, optimizer state array and callback array (EarlyStopping's best weights),
``meta.json`` (format version, the network's signature, its source text, the compile
arguments, the optimizer's hyperparameters, the step/epoch/random-draw counters, the callbacks'
states, the history) and ``manifest.json`` (the SHA-256 of every other member). The zip comment
holds the manifest's SHA-256, so a flipped bit anywhere that matters is detected: every member
is read whole (its CRC checked) and hashed, the set of members must be exactly the one the
manifest and the model call for, and every value is checked against the model.

Loading never runs code from the file: ``load(path, net=net)`` compiles the given network and
refuses a checkpoint of another one; only ``trust_source=True`` executes the stored source.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from .. import diskcache

FORMAT, VERSION = "cnncompile-checkpoint", 2
META, MANIFEST = "meta.json", "manifest.json"
COMMENT = b"cnncompile-checkpoint manifest sha256="
ARRAY_DTYPES = ("float32", "float64", "int64")
MAX_NPY_HEADER = 1 << 16


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another network."""


# ----- the network's identity ----------------------------------------------------------------------
def network_signature(tracer) -> dict:
    """What must match for a checkpoint's arrays to mean the same thing: the traced layers (name,
    kind, attributes) and every parameter's and buffer's name and shape."""
    ops = [[n.name, n.kind, json.dumps(n.attrs, sort_keys=True, default=str)] for n in tracer.graph.ops]
    shapes = {name: [int(s) for s in t.shape] for name, t in tracer.graph.tensors.items()
              if t.role in ("param", "buffer")}
    digest = hashlib.sha256(json.dumps([ops, shapes], sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "state": shapes}


def signature(model) -> dict:
    return network_signature(model.tracer)


def _json_value(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _spec_of(value):
    """Losses and loss weights as JSON: a loss is its class name and the arguments it was given
    (``{"__loss__": name, "args": {...}}``); heads make a list or dict of them."""
    if hasattr(value, "kind"):
        given = getattr(value, "_given", {})
        return {"__loss__": type(value).__name__, "args": {k: _json_value(v) for k, v in given.items()}}
    if isinstance(value, dict):
        return {k: _spec_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_spec_of(v) for v in value]
    return value


def _from_spec(spec, path):
    """Losses back from their class names and arguments: only loss classes of ``cnncompile.nn``."""
    from cnncompile import nn
    from cnncompile.ir.errors import CompileError
    from cnncompile.nn.loss import Loss
    if isinstance(spec, dict) and "__loss__" in spec:
        name, args = spec["__loss__"], spec.get("args", {})
        cls = getattr(nn, name, None) if isinstance(name, str) else None
        _need(isinstance(cls, type) and issubclass(cls, Loss) and cls is not Loss and isinstance(args, dict),
              path, f"unknown loss {name!r} in meta.json")
        try:
            return cls(**args)
        except (CompileError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: the arguments of its {name} do not fit ({exc})") from None
    if isinstance(spec, dict):
        return {k: _from_spec(v, path) for k, v in spec.items()}
    if isinstance(spec, list):
        return tuple(_from_spec(v, path) for v in spec)
    _need(spec is None or _is_number(spec), path, f"a loss or loss weight in meta.json is {spec!r}")
    return spec


def _need(condition, path, what: str) -> None:
    if not condition:
        raise CheckpointError(f"checkpoint {path}: {what}; it cannot be loaded — use an earlier checkpoint")


# ----- writing -------------------------------------------------------------------------------------
def _callback_states(model) -> list:
    """[class name, state] of the model's callbacks; a loaded model not yet fitted keeps the
    states it was loaded with."""
    if not model.callbacks:
        return list(getattr(model, "pending_callback_states", None) or [])
    return [[type(cb).__name__, cb.state_dict()] for cb in model.callbacks]


def _encode_callbacks(states) -> tuple[list, dict]:
    """Callback states as JSON, their arrays (EarlyStopping's best weights) as members of their own."""
    arrays: dict[str, np.ndarray] = {}

    def encode(value, where):
        if isinstance(value, np.ndarray):
            arrays[where] = value
            return {"__array__": where}
        if isinstance(value, dict):
            return {str(k): encode(v, f"{where}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{where}/{i}") for i, v in enumerate(value)]
        return value.item() if isinstance(value, np.generic) else value

    return [[name, encode(state, f"callback/{i}")] for i, (name, state) in enumerate(states)], arrays


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
    return out.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    """Stored members in a fixed order with fixed dates: the same state gives the same bytes."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    manifest = json.dumps({"format": FORMAT, "version": VERSION, "members": digests}, sort_keys=True).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in [*members.items(), (MANIFEST, manifest)]:
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        zf.comment = COMMENT + hashlib.sha256(manifest).hexdigest().encode()
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """The file replaced whole (`diskcache.atomic_write`, synced to disk), after the temporary
    files of earlier saves to it that were killed before their rename are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    diskcache.remove_stale_temps(path)
    diskcache.atomic_write(path, data)


def save(model, path) -> None:
    path = Path(path)
    arrays = {f"state/{n}": model.executable.state[n] for n in model.prog.state_names}
    for name, spec in model.prog.tensors.items():
        if spec.role == "state":
            arrays[f"optim/{name}"] = model.executable.state[name]
    callbacks, callback_arrays = _encode_callbacks(_callback_states(model))
    arrays.update(callback_arrays)
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
        "callbacks": callbacks,
        "history": model.history,
    }
    members = {META: json.dumps(meta).encode()}
    members.update({f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()})
    _write_atomically(path, _zip_bytes(members))


# ----- reading: every byte checked -----------------------------------------------------------------
def _members(f, path) -> tuple[dict[str, bytes], bytes]:
    """Every member of the zip in ``f`` read whole (so its CRC is checked), and the zip comment."""
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            _need(len(names) == len(set(names)), path, "a member name appears twice")
            for info in infos:
                _need(info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1
                      and info.file_size == info.compress_size, path,
                      f"member {info.filename!r} is compressed or encrypted, which cnncompile never writes")
            members = {info.filename: zf.read(info) for info in infos}
            return members, zf.comment
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        f.seek(0)
        if f.read(2) != b"PK":
            raise CheckpointError(f"{path} is not a cnncompile checkpoint (not a zip archive: {exc})") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({exc}); it cannot be loaded — "
                              f"use an earlier checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - any damage the zip reader trips over is a damaged checkpoint
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(exc).__name__}: {exc}); it "
                              f"cannot be loaded — use an earlier checkpoint") from None


def _manifest(members: dict, comment: bytes, path: Path) -> dict:
    """The manifest, checked against the comment's digest, and every member against the manifest."""
    if MANIFEST not in members:
        if "meta.json.npy" in members:
            raise CheckpointError(f"{path} is a checkpoint of format 1 (an older cnncompile, without digests); "
                                  f"this cnncompile reads format {VERSION}: load it with the cnncompile that "
                                  f"wrote it, or retrain")
        if META not in members and not comment.startswith(COMMENT):
            raise CheckpointError(f"{path} is not a cnncompile checkpoint (a zip without its manifest)")
        _need(False, path, "truncated or corrupted (manifest.json is missing)")
    _need(comment.startswith(COMMENT), path, "truncated or corrupted (the zip comment lost its manifest digest)")
    _need(comment[len(COMMENT):] == hashlib.sha256(members[MANIFEST]).hexdigest().encode(), path,
          "truncated or corrupted (manifest.json does not match its digest in the zip comment)")
    try:
        manifest = json.loads(members[MANIFEST].decode())
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: manifest.json is not valid JSON") from None
    _need(isinstance(manifest, dict) and manifest.get("format") == FORMAT, path, "manifest.json has another format")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')}; this cnncompile reads "
                              f"{VERSION} (save it again with the cnncompile that wrote it, or retrain)")
    digests = manifest.get("members")
    _need(isinstance(digests, dict), path, "manifest.json lists no members")
    listed, present = set(digests), set(members) - {MANIFEST}
    _need(listed == present, path, f"truncated or corrupted (members missing: {sorted(listed - present)[:3]}, "
                                   f"not in the manifest: {sorted(present - listed)[:3]})")
    for name, data in members.items():
        if name != MANIFEST:
            _need(hashlib.sha256(data).hexdigest() == digests[name], path,
                  f"truncated or corrupted (member {name!r} does not match its SHA-256 in the manifest)")
    return manifest


def _npy(data: bytes, name: str, path: Path) -> np.ndarray:
    """A ``.npy`` member parsed from its bytes: no pickles, exactly the data its header announces."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        _need(read_header is not None, path, f"member {name!r} has .npy version {version}")
        shape, fortran, dtype = read_header(f, max_header_size=MAX_NPY_HEADER)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - NumPy's header parser raises many kinds on damaged text
        raise CheckpointError(f"checkpoint {path}: member {name!r} has a damaged .npy header "
                              f"({type(exc).__name__}: {exc})") from None
    _need(dtype.name in ARRAY_DTYPES and dtype.isnative, path,
          f"member {name!r} holds {dtype.str} values; checkpoints hold native {', '.join(ARRAY_DTYPES)}")
    count = math.prod(shape)
    _need(len(data) - f.tell() == count * dtype.itemsize, path,
          f"member {name!r} holds {len(data) - f.tell()} bytes of data, its header announces {shape} {dtype}")
    array = np.frombuffer(data, dtype, count, f.tell()).reshape(shape, order="F" if fortran else "C")
    return np.array(array, order="C", copy=True)  # (ascontiguousarray makes a 0-d array 1-d)


def read(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint, every byte checked; errors say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with open(path, "rb") as f:
        return read_from(f, path)


def read_from(f, path) -> tuple[dict, dict]:
    """(meta, arrays) from an open binary file ``f`` (``path`` names it in errors)."""
    members, comment = _members(f, path)
    _manifest(members, comment, path)
    _need(META in members, path, "meta.json is missing")
    try:
        meta = json.loads(members.pop(META).decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"checkpoint {path}: meta.json is not valid JSON") from None
    members.pop(MANIFEST)
    unknown = [n for n in members if not n.endswith(".npy")]
    _need(not unknown, path, f"unexpected members {unknown[:3]}")
    arrays = {name[:-len(".npy")]: _npy(data, name, path) for name, data in members.items()}
    _check_meta(meta, path)
    return meta, arrays


# ----- meta.json's values ----------------------------------------------------------------------------
def _is_int(v, low=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_meta(meta, path) -> None:
    """Every field of meta.json has the type and range a saved model gives it."""
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, path, "meta.json is not a cnncompile checkpoint's")
    _need(meta.get("version") == VERSION, path, f"meta.json has version {meta.get('version')}, expected {VERSION}")
    sig = meta.get("signature")
    _need(isinstance(sig, dict) and isinstance(sig.get("digest"), str) and isinstance(sig.get("state"), dict)
          and all(isinstance(v, list) and all(_is_int(s) for s in v) for v in sig["state"].values()),
          path, "meta.json's network signature is malformed")
    net = meta.get("network")
    _need(isinstance(net, dict) and all(isinstance(net.get(k), (str, type(None))) for k in ("source", "file")),
          path, "meta.json's network entry is malformed")
    comp = meta.get("compile")
    _need(isinstance(comp, dict) and isinstance(comp.get("input_shape"), list) and comp["input_shape"]
          and all(_is_int(s, 1) for s in comp["input_shape"]), path, "meta.json's input_shape is malformed")
    _need(comp.get("backend") in ("llvm", "numpy") and comp.get("dtype") in ("float32", "float64")
          and _is_int(comp.get("seed"), -2 ** 63), path, "meta.json's backend, dtype or seed is malformed")
    opt = meta.get("optimizer")
    _need(opt is None or (isinstance(opt, dict) and isinstance(opt.get("class"), str)
                          and isinstance(opt.get("hyper"), dict) and _is_number(opt["hyper"].get("lr"))
                          and math.isfinite(opt["hyper"]["lr"]) and opt["hyper"]["lr"] >= 0),
          path, "meta.json's optimizer entry is malformed")
    counters = meta.get("counters")
    _need(isinstance(counters, dict) and all(_is_int(counters.get(k)) for k in
                                             ("step", "epoch", "noise_draws", "batches_tracked"))
          and _is_int(counters.get("noise_seed"), -2 ** 63), path, "meta.json's counters are malformed")
    callbacks = meta.get("callbacks")
    _need(isinstance(callbacks, list) and all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str)
                                              and isinstance(c[1], dict) for c in callbacks),
          path, "meta.json's callback states are malformed")
    history = meta.get("history")
    _need(isinstance(history, dict) and all(isinstance(v, list) and all(_is_number(x) for x in v)
                                            for v in history.values()), path, "meta.json's history is malformed")


# ----- putting it into a model -------------------------------------------------------------------------
def _decode_callbacks(states: list, arrays: dict, path) -> tuple[list, set]:
    """Callback states with their arrays put back; and the array members they used."""
    used: set[str] = set()

    def decode(value):
        if isinstance(value, dict) and set(value) == {"__array__"}:
            ref = value["__array__"]
            _need(isinstance(ref, str) and ref.startswith("callback/") and ref in arrays and ref not in used,
                  path, f"callback array {ref!r} is missing")
            used.add(ref)
            _need(bool(np.all(np.isfinite(arrays[ref]))), path, f"callback array {ref!r} holds NaN or Inf")
            return arrays[ref]
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return [[name, decode(state)] for name, state in states], used


def _expected_arrays(model) -> dict[str, np.ndarray]:
    expected = {f"state/{n}": model.executable.state[n] for n in model.prog.state_names}
    for name, spec in model.prog.tensors.items():
        if spec.role == "state":
            expected[f"optim/{name}"] = model.executable.state[name]
    return expected


def restore(model, meta: dict, arrays: dict, path) -> None:
    """Put a checkpoint's state into ``model``: the exact set of arrays, each of the model's shape
    and dtype and finite, all checked before anything is written."""
    check_network(model.tracer, meta, path)
    callbacks, used = _decode_callbacks(meta["callbacks"], arrays, path)
    expected = _expected_arrays(model)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected) - used)
    _need(not missing, path, f"arrays missing: {missing[:3]} (saved with another optimizer than "
                             f"{type(model.optimizer).__name__}?)")
    _need(not extra, path, f"arrays this model does not have: {extra[:3]}")
    for key, want in expected.items():
        value = arrays[key]
        _need(value.shape == want.shape and value.dtype == want.dtype, path,
              f"{key} is {value.dtype}{list(value.shape)}, the model's is {want.dtype}{list(want.shape)}")
        _need(bool(np.all(np.isfinite(value))), path, f"{key} holds NaN or Inf")
    for key, want in expected.items():
        want[...] = arrays[key]
    if meta["optimizer"] is not None and model.optimizer is not None:
        model.optimizer.lr = float(meta["optimizer"]["hyper"]["lr"])
    c = meta["counters"]
    model.step, model.epoch, model.noise_seed = c["step"], c["epoch"], c["noise_seed"]
    model.noise_draws, model.batches_tracked = c["noise_draws"], c["batches_tracked"]
    model.pending_callback_states = callbacks
    model.history = meta["history"]


def check_network(tracer, meta: dict, path) -> None:
    """The checkpoint's network signature against the traced network's, naming what differs."""
    mine, theirs = network_signature(tracer), meta["signature"]
    if mine["digest"] == theirs["digest"]:
        return
    diff = [f"{k}: checkpoint {theirs['state'].get(k)} vs model {v}" for k, v in mine["state"].items()
            if theirs["state"].get(k) != v]
    extra = sorted(set(theirs["state"]) - set(mine["state"]))
    detail = "; ".join(diff[:3] + ([f"keys only in the checkpoint: {extra[:3]}"] if extra else []))
    written_by = meta["network"].get("file")
    raise CheckpointError(f"checkpoint {path} was saved from a different network"
                          f"{' (' + written_by + ')' if written_by else ''} than the one given"
                          f"{' (' + detail + ')' if detail else ' (same shapes, different layers)'}; "
                          f"load it with the network that wrote it")


def _stored_network(meta: dict, path):
    """The network from the source stored in the checkpoint: runs that code (trust_source=True)."""
    source = meta["network"].get("source")
    if not source:
        raise CheckpointError(f"checkpoint {path} does not hold the network's source; pass net=... to cc.load")
    namespace: dict = {"__name__": "cnncompile_checkpoint_network",
                       "__file__": meta["network"].get("file") or "<checkpoint>"}
    exec(compile(source, namespace["__file__"], "exec"), namespace)  # noqa: S102 - the caller trusts this file
    if "net" not in namespace:
        raise CheckpointError(f"checkpoint {path}: its stored source defines no `net`")
    return namespace["net"]


def _optimizer(meta: dict, path):
    from cnncompile import optim
    if meta["optimizer"] is None:
        return None
    cls = getattr(optim, meta["optimizer"]["class"], None)
    _need(isinstance(cls, type) and issubclass(cls, optim.Optimizer) and cls is not optim.Optimizer, path,
          f"unknown optimizer {meta['optimizer']['class']!r}")
    try:
        return cls(**meta["optimizer"]["hyper"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: the optimizer's hyperparameters do not fit "
                              f"{cls.__name__} ({exc})") from None


def _trace(net, meta: dict, path):
    """Trace ``net`` with the checkpoint's input shape and losses; a net that does not fit them is
    another network."""
    from cnncompile.compiler import trace
    from cnncompile.ir.errors import CompileError
    comp = meta["compile"]
    try:
        tracer, *_ = trace(net, tuple(comp["input_shape"]), _from_spec(comp["loss"], path),
                           _from_spec(comp["loss_weights"], path))
    except CompileError as exc:
        raise CheckpointError(f"checkpoint {path} was saved from a different network than the one given "
                              f"(tracing it with the checkpoint's input shape {tuple(comp['input_shape'])} "
                              f"fails: {exc})") from None
    return tracer


def load(path, net=None, backend=None, trust_source: bool = False):
    """A compiled model that continues exactly where the checkpoint left off.

    ``net``: the network (an ``nn.Module``) that wrote the checkpoint; a checkpoint of another
    network is refused. Loading never runs code from the file: only with ``trust_source=True``
    (for files you trust) and no ``net`` is the network source stored in it executed.
    ``backend``: default, the one that saved it.
    """
    import cnncompile as cc
    meta, arrays = read(path)
    if net is None:
        if not trust_source:
            raise CheckpointError(f"cc.load({str(path)!r}) needs the network: pass net=... (the nn.Module that "
                                  f"wrote it); loading never runs code from the file unless trust_source=True "
                                  f"(only for files you trust: it executes the network source stored in them)")
        net = _stored_network(meta, path)
    check_network(_trace(net, meta, path), meta, path)
    comp = meta["compile"]
    model = cc.compile(net, input_shape=tuple(comp["input_shape"]), loss=_from_spec(comp["loss"], path),
                       loss_weights=_from_spec(comp["loss_weights"], path), optimizer=_optimizer(meta, path),
                       backend=backend or comp["backend"], dtype=comp["dtype"], seed=comp["seed"])
    model.source_text, model.source_file = meta["network"].get("source"), meta["network"].get("file")
    restore(model, meta, arrays, path)
    return model

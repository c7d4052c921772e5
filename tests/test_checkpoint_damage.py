"""Damaged checkpoints never load silently: every flipped bit in the zip and .npy structure and
every truncation either raises CheckpointError or reads back exactly what was saved; files that
are not checkpoints, and stale temporary files of killed saves."""
import io
import struct
import zipfile

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.training import checkpoint


def tiny_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def linear_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))


def tiny_checkpoint(path, make=tiny_net):
    """A trained tiny model (momentum non-zero) saved to ``path``; returns the model."""
    model = cc.compile(make(), (1, 6, 6), loss=nn.CrossEntropyLoss(),
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9), backend="numpy", seed=1)
    rng = np.random.default_rng(0)
    for _ in range(2):
        model.train_step(rng.standard_normal((4, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 4))
    model.save(path)
    return model


def structure_offsets(data: bytes) -> list[int]:
    """Offsets of every byte that is not member payload: zip local headers, the central directory,
    the end record with its comment, and each .npy member's header."""
    offsets = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    for info in infos:
        at = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
        body = at + 30 + name_len + extra_len
        offsets += range(at, body)
        if info.filename.endswith(".npy"):
            f = io.BytesIO(data[body:body + info.file_size])
            version = np.lib.format.read_magic(f)
            {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version](f)
            offsets += range(body, body + f.tell())
    offsets += range(start_dir, len(data))
    return offsets


def outcome(data: bytes, original):
    """'error' (CheckpointError), 'same' (read back exactly as saved), or what else happened."""
    try:
        meta, arrays = checkpoint.read_from(io.BytesIO(data), "damaged.ckpt")
    except cc.CheckpointError:
        return "error"
    except Exception as exc:  # noqa: BLE001 - the sweep reports any other kind
        return f"other: {type(exc).__name__}: {exc}"
    same = meta == original[0] and arrays.keys() == original[1].keys() and all(
        arrays[k].dtype == v.dtype and arrays[k].shape == v.shape and np.array_equal(arrays[k], v)
        for k, v in original[1].items())
    return "same" if same else "silent"


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1:]


def test_every_structure_bit_flip_and_truncation_is_caught_or_harmless(tmp_path):
    """Reading is a pure function of the file's bytes (checked here from memory: `read` opens the
    file and hands it to `read_from`), and loading a pure function of what is read; so a read that
    returns exactly the saved meta and arrays loads exactly the saved model. (A one-layer net keeps
    this under a minute: what matters is the kinds of members, parameters and momentum buffers;
    bench/checkpoint_sweep.py sweeps a convolutional net with full loads.)"""
    path = tmp_path / "good.ckpt"
    tiny_checkpoint(path, linear_net)
    data = path.read_bytes()
    original = checkpoint.read(path)
    results = {}
    offsets = structure_offsets(data)
    payload = sorted(set(range(len(data))) - set(offsets))[::97]  # a sample of member contents too
    for offset in offsets + payload:
        for bit in range(8):
            results[f"flip {offset}.{bit}"] = outcome(flipped(data, offset, bit), original)
    for length in range(len(data)):
        results[f"truncate {length}"] = outcome(data[:length], original)
    wrong = {k: v for k, v in results.items() if v not in ("error", "same")}
    assert not wrong, f"{len(wrong)} of {len(results)} damaged files: {list(wrong.items())[:5]}"
    assert sum(v == "error" for v in results.values()) > len(results) // 2


def test_harmless_flips_load_the_saved_model(tmp_path):
    """Flips the reader ignores (a local header's date, CRC and sizes) load the very same state."""
    path = tmp_path / "good.ckpt"
    model = tiny_checkpoint(path)
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        first = zf.infolist()[1].header_offset  # a weight member's local header
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(flipped(flipped(data, first + 10, 0), first + 18, 3))  # date, compressed size
    loaded = cc.load(bad, net=tiny_net())
    for name, value in model.executable.state.items():
        if name in loaded.executable.state and name in model.prog.tensors and \
                model.prog.tensors[name].role in ("param", "buffer", "state"):
            np.testing.assert_array_equal(loaded.executable.state[name], value, err_msg=name)


def test_npy_header_length_flip_is_an_error(tmp_path):
    """The flip that shifted the weights: the .npy header-length byte of a weight member."""
    path = tmp_path / "good.ckpt"
    tiny_checkpoint(path)
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("state/0.weight.npy")
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])
    length_byte = at + 30 + name_len + extra_len + 8
    bad = tmp_path / "bad.ckpt"
    for bit in range(8):
        bad.write_bytes(flipped(data, length_byte, bit))
        with pytest.raises(cc.CheckpointError):
            cc.load(bad, net=tiny_net())


def test_central_directory_comment_length_flip_is_an_error(tmp_path):
    """Enlarging a member's comment length in the central directory hid every later member."""
    path = tmp_path / "good.ckpt"
    tiny_checkpoint(path)
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        at = zf.start_dir
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(flipped(data, at + 32, 4))  # the first entry's comment length: 0 → 16
    with pytest.raises(cc.CheckpointError, match="truncated or corrupted|missing"):
        cc.load(bad, net=tiny_net())


def test_missing_and_extra_members_are_errors(tmp_path):
    path = tmp_path / "good.ckpt"
    tiny_checkpoint(path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    for change in ["drop", "add"]:
        edited = dict(members)
        if change == "drop":
            del edited["optim/0.weight.momentum_buffer.npy"]
        else:
            edited["state/extra.npy"] = edited["state/0.bias.npy"]
        bad = tmp_path / f"{change}.ckpt"
        with zipfile.ZipFile(bad, "w") as zf:
            for name, value in edited.items():
                zf.writestr(name, value)
        with pytest.raises(cc.CheckpointError, match="missing|not in the manifest|manifest digest"):
            cc.load(bad, net=tiny_net())


@pytest.mark.parametrize("kind", ["npy", "npz", "text", "directory"])
def test_a_file_that_is_not_a_checkpoint_is_an_error(tmp_path, kind):
    path = tmp_path / f"weights.{kind}"
    if kind == "npy":
        np.save(path, np.zeros((3, 3), np.float32))
    elif kind == "npz":
        np.savez(path, w=np.zeros(3))
        path = tmp_path / "weights.npz"
    elif kind == "text":
        path.write_text("net = 1\n")
    else:
        path.mkdir()
    with pytest.raises(cc.CheckpointError, match="not a cnncompile checkpoint|not a file"):
        cc.load(path, net=tiny_net())


def test_stale_temporary_files_are_removed_at_the_next_save(tmp_path):
    """Only this save's own temporary-file pattern next to the target is touched."""
    path = tmp_path / "run.ckpt"
    stale = [tmp_path / ".tmp-run.ckpt-k3x_9abz", tmp_path / ".tmp-run.ckpt-00000000"]
    kept = [tmp_path / ".tmp-other.ckpt-k3x_9abz", tmp_path / "tmp-run.ckpt-k3x_9abz",
            tmp_path / ".tmp-run.ckpt-", tmp_path / ".tmp-run.ckpt-longer_name", tmp_path / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    tiny_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept + [path])


def test_checkpoint_bytes_are_reproducible(tmp_path):
    """The same state saves to the same bytes (fixed member order and dates)."""
    model = tiny_checkpoint(tmp_path / "a.ckpt")
    model.save(tmp_path / "b.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()


def test_non_finite_or_mistyped_arrays_are_refused(tmp_path):
    """A well-formed file whose values do not fit the model (rewritten with a fresh manifest)."""
    path = tmp_path / "good.ckpt"
    tiny_checkpoint(path)
    meta, arrays = checkpoint.read(path)
    for name, value, message in [("optim/0.weight.momentum_buffer", np.full((2, 1, 3, 3), np.nan, np.float32),
                                  "NaN or Inf"),
                                 ("state/0.bias", np.zeros(2, np.float64), "float64"),
                                 ("state/3.weight", np.zeros((3, 31), np.float32), r"\[3, 31\]")]:
        edited = {**arrays, name: value}
        members = {checkpoint.META: __import__("json").dumps(meta).encode()}
        members.update({f"{k}.npy": checkpoint._npy_bytes(v) for k, v in edited.items()})
        bad = tmp_path / "bad.ckpt"
        bad.write_bytes(checkpoint._zip_bytes(members))
        with pytest.raises(cc.CheckpointError, match=message):
            cc.load(bad, net=tiny_net())


def test_a_format_1_checkpoint_says_so(tmp_path):
    """The earlier format (np.savez with meta.json.npy, no digests) is named, not misread."""
    path = tmp_path / "old.ckpt"
    with open(path, "wb") as f:
        np.savez(f, **{"meta.json": np.frombuffer(b'{"format": "cnncompile-checkpoint", "version": 1}', np.uint8),
                       "state/0.weight": np.zeros((2, 1, 3, 3), np.float32)})
    with pytest.raises(cc.CheckpointError, match="format 1"):
        cc.load(path, net=tiny_net())

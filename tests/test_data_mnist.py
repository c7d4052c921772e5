"""MNIST readers: IDX (plain and gzip), mnist.pkl.gz, the bundled copy, and their errors."""
import gzip
import pickle
import struct

import numpy as np
import pytest

from cnncompile.training.data import load_mnist, pad_images, read_idx
from cnncompile.training.fit import batches


def idx_bytes(array: np.ndarray, code=0x08) -> bytes:
    head = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(a)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path), a)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    path.write_bytes(idx_bytes(f, 0x0D))
    np.testing.assert_array_equal(read_idx(path), f)


@pytest.mark.parametrize("content,message", [
    (idx_bytes(np.zeros((10, 4), np.uint8))[:-5], "truncated"),
    (b"\x01\x02\x03\x04" + bytes(20), "bad magic"),
    (b"\x00\x00\x08", "bad magic"),
    (bytes([0, 0, 8, 3, 0, 0]), "header is truncated"),
    (b"\x1f\x8b garbage that is not gzip", "corrupt gzip"),
    (np.random.default_rng(0).bytes(1000), "not an IDX file"),
])
def test_idx_errors(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def write_idx_dir(directory, n_train=12, n_test=3, labels_max=9):
    rng = np.random.default_rng(0)
    for stem, n in [("train", n_train), ("t10k", n_test)]:
        (directory / f"{stem}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))))
        (directory / f"{stem}-labels-idx1-ubyte").write_bytes(
            idx_bytes(rng.integers(0, labels_max + 1, n).astype(np.uint8)))


def test_idx_directory(tmp_path):
    write_idx_dir(tmp_path)
    data = load_mnist(tmp_path)
    assert data["train"].images.shape == (12, 1, 28, 28) and data["test"].labels.shape == (3,)
    assert data["train"].images.dtype == np.float32 and 0 <= data["train"].images.min() <= data["train"].images.max() <= 1


def test_idx_directory_errors(tmp_path):
    write_idx_dir(tmp_path, labels_max=12)
    with pytest.raises(ValueError, match="labels must be 0..9"):
        load_mnist(tmp_path)
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_pickle_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    splits = tuple((rng.random((n, 784)).astype(np.float32), rng.integers(0, 10, n)) for n in (5, 2, 3))
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f)
    data = load_mnist(path)
    assert [len(data[k]) for k in ("train", "val", "test")] == [5, 2, 3]
    np.testing.assert_array_equal(data["val"].images.reshape(2, 784), splits[1][0])
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable mnist.pkl.gz"):
        load_mnist(path)
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path / "absent.pkl.gz")


def test_bundled_copy():
    data = load_mnist()
    assert data["train"].images.shape == (50000, 1, 28, 28)
    assert len(data["val"]) == len(data["test"]) == 10000
    assert data["test"].labels.min() == 0 and data["test"].labels.max() == 9


def test_pad_and_batches():
    x = np.random.default_rng(0).random((5, 1, 28, 28)).astype(np.float32)
    p = pad_images(x)
    assert p.shape == (5, 1, 32, 32) and p[:, :, :2].sum() == 0 and p[:, :, :, -2:].sum() == 0
    np.testing.assert_array_equal(p[:, :, 2:30, 2:30], x)
    y = np.arange(5)
    first = [yb.tolist() for _, yb in batches(x, y, 2, seed=0, epoch=1)]
    assert sorted(sum(first, [])) == list(range(5)) and [len(b) for b in first] == [2, 2, 1]
    assert first == [yb.tolist() for _, yb in batches(x, y, 2, seed=0, epoch=1)]
    assert first != [yb.tolist() for _, yb in batches(x, y, 2, seed=0, epoch=2)]


def test_cifar10_python_batches(tmp_path):
    import pickle

    from cnncompile.training.data.cifar import load_cifar10
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 20).tolist()
        raw[name] = (data, labels)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    splits = load_cifar10(tmp_path, validation=10)
    assert splits["train"].images.shape == (90, 3, 32, 32) and splits["val"].images.shape == (10, 3, 32, 32)
    assert splits["test"].images.dtype == np.float32 and len(splits["test"]) == 20
    first = raw["data_batch_1"][0][0].reshape(3, 32, 32) / 255.0
    from cnncompile.training.data.cifar import MEAN, STD
    np.testing.assert_allclose(splits["train"].images[0], (first - MEAN) / STD, rtol=1e-5)
    assert list(splits["val"].labels) == raw["data_batch_5"][1][10:]
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 Python batch"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch").unlink()
    (tmp_path / "data_batch_3").write_bytes((tmp_path / "data_batch_2").read_bytes())
    with pytest.raises(FileNotFoundError, match="test_batch is missing"):
        load_cifar10(tmp_path)

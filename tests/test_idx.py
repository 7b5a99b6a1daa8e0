"""IDX files (MNIST family) and the datasets read from them; the tests write small files."""

import gzip
import struct

import numpy as np
import pytest

from fedsynth.config import DataConfig, config_from_dict
from fedsynth.core.errors import DataError
from fedsynth.data.datasets import load_dataset
from fedsynth.data.idx import read_idx


def write_idx(path, array, gz=None):
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    raw = b"\0\0" + bytes([code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(folder, n_train=12, n_test=6, size=28, test=True, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)) if test else (("train", n_train),):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, size, size), np.uint8)
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_read_idx_plain_and_gzipped(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert (read_idx(write_idx(tmp_path / "a", a)) == a).all()
    assert (read_idx(write_idx(tmp_path / "a.gz", a)) == a).all()
    b = np.array([1, -2, 3], dtype=">i4")
    assert read_idx(write_idx(tmp_path / "b", b)).tolist() == [1, -2, 3]


def test_bad_idx_files_are_one_line_errors_naming_the_file(tmp_path):
    good = write_idx(tmp_path / "x", np.zeros((2, 3, 3), np.uint8)).read_bytes()
    cases = {
        "truncated": (good[:-1], r"truncated: 17 data bytes for shape \(2, 3, 3\) \(18 expected\)"),
        "magic": (b"\x12\x34" + good[2:], r"magic: not an IDX file \(magic bytes 12340803\)"),
        "header": (good[:6], r"header: truncated IDX header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message) as err:
            read_idx(tmp_path / name)
        assert "\n" not in str(err.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.gz: unreadable gzip data"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match=r"IDX file not found: .*nope"):
        read_idx(tmp_path / "nope")


def test_fashion_mnist_uses_its_official_test_split_names_and_native_size(tmp_path):
    folder = fake_mnist(tmp_path / "fm")
    cfg = config_from_dict({"data": {"dataset": "fashion-mnist", "path": str(folder)}})
    assert cfg.data.image_size == 28
    split = load_dataset(cfg.data)
    assert split.full.images.shape == (18, 1, 28, 28)
    assert split.train_indices.tolist() == list(range(12)) and split.test_indices.tolist() == list(
        range(12, 18)
    )
    assert split.full.class_names[0] == "T-shirt/top" and split.full.class_names[-1] == "Ankle boot"


def test_idx_without_a_test_split_falls_back_to_the_stratified_one(tmp_path):
    folder = fake_mnist(tmp_path / "m", n_train=40, test=False, size=8, gz=False)
    split = load_dataset(DataConfig(dataset="idx", path=str(folder), image_size=8))
    assert split.full.class_names == tuple("0123456789")
    assert len(split.test_indices) == 10  # 20% of each class of 4


def test_idx_count_mismatch_and_missing_labels(tmp_path):
    folder = fake_mnist(tmp_path / "m", test=False)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match=r"12 images but train-labels-idx1-ubyte\.gz has 5 labels"):
        load_dataset(DataConfig(dataset="idx", path=str(folder)))
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[\.gz\] is missing"):
        load_dataset(DataConfig(dataset="idx", path=str(folder)))

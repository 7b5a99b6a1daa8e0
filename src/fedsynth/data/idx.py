"""IDX files, the MNIST family's format (LeCun et al.): two zero bytes, a type code, the number
of dimensions, each dimension as a big-endian uint32, then the values. Read whole and
vectorised (one ``numpy.frombuffer``), gzipped or not; any defect is a one-line error naming
the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedsynth.core.errors import DataError

TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4")}
TYPES |= {0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable gzip data ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in TYPES:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = TYPES[raw[2]]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} data bytes for shape {dims} ({expected} expected)")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def read_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images (N, H, W), labels (N,)) from ``PREFIX-images-idx3-ubyte[.gz]`` and
    ``PREFIX-labels-idx1-ubyte[.gz]``; None when neither file exists."""
    images_at = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_at = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if images_at is None and labels_at is None:
        return None
    if images_at is None or labels_at is None:
        missing = f"{prefix}-{'images-idx3' if images_at is None else 'labels-idx1'}-ubyte[.gz]"
        raise DataError(f"{folder}: {missing} is missing")
    images, labels = read_idx(images_at), read_idx(labels_at)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{images_at}: expected images (N, H, W) and labels (N,), got {images.shape}, {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{images_at}: {len(images)} images but {labels_at.name} has {len(labels)} labels")
    return images, labels

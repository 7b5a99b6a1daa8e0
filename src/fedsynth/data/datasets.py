"""Image datasets held in memory as float tensors in [-1, 1] (N, C, H, W).

Three sources: the embedded ``digits`` (scikit-learn's 1,797 real 8x8 handwritten
digits, shipped inside scikit-learn), an ``imagefolder`` (one sub-folder per class)
and an ``npz`` file (``images`` + ``labels`` [+ ``class_names``]). A seeded, stratified
held-out test split is carved once per dataset and never used in training.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fedsynth.config import DataConfig
from fedsynth.core.errors import DataError, first_line
from fedsynth.data.idx import find_idx, read_pair

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageData:
    """Images in [-1, 1] with integer labels and the class names they index."""

    images: torch.Tensor  # float32 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: np.ndarray | list[int]) -> ImageData:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageData(self.images[idx], self.labels[idx], self.class_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)


@dataclass(frozen=True)
class SplitDataset:
    """The whole dataset plus the indices of its training and held-out test parts."""

    full: ImageData
    train_indices: np.ndarray
    test_indices: np.ndarray

    @property
    def train(self) -> ImageData:
        return self.full.subset(self.train_indices)

    @property
    def test(self) -> ImageData:
        return self.full.subset(self.test_indices)


def load_images(cfg: DataConfig) -> ImageData:
    """The whole dataset named by ``cfg`` (no split), its class names and labels checked."""
    return _load(cfg)[0]


def _load(cfg: DataConfig) -> tuple[ImageData, int]:
    """(the whole dataset, how many of its last images are an official test split, or 0)."""
    if cfg.dataset in ("fashion-mnist", "idx"):
        data, official_test = _load_idx(cfg)
    else:
        loaders = {"digits": _load_digits, "imagefolder": _load_imagefolder, "npz": _load_npz}
        data, official_test = loaders[cfg.dataset](cfg), 0
    check_classes(data, cfg.path or cfg.dataset)
    return data, official_test


UNSAFE_IN_NAMES = re.compile(r"[/\\:\x00-\x1f\x7f]")


def folder_name(name: str) -> str:
    """The folder a class's images are written to: the name with path separators, ':' and
    control characters replaced by '_', leading dots and spaces dropped (never a path
    outside its parent, never hidden)."""
    return UNSAFE_IN_NAMES.sub("_", name).lstrip(". ").rstrip()


def check_classes(data: ImageData, source: str) -> None:
    """Every class name gives a distinct, non-empty folder name; every class has images
    (no gaps in label numbers)."""
    seen: dict[str, str] = {}
    for name in data.class_names:
        folder = folder_name(name)
        if not folder:
            raise DataError(f"{source}: class name {name!r} gives no usable folder name")
        if folder.casefold() in seen:
            first = seen[folder.casefold()]
            raise DataError(f"{source}: class names {first!r} and {name!r} would share one folder")
        seen[folder.casefold()] = name
    counts = np.bincount(data.labels.numpy(), minlength=len(data.class_names))
    if empty := [data.class_names[i] for i in np.flatnonzero(counts == 0)]:
        raise DataError(f"{source}: classes {empty} have no images (labels must be 0..K-1, no gaps)")


def load_dataset(cfg: DataConfig) -> SplitDataset:
    """The dataset with its seeded held-out test split."""
    full, official_test = _load(cfg)
    if official_test:  # the dataset's own test split (data.test_fraction does not apply)
        n = len(full)
        return SplitDataset(full, np.arange(n - official_test), np.arange(n - official_test, n))
    train_idx, test_idx = stratified_split(full.labels.numpy(), cfg.test_fraction, cfg.split_seed)
    return SplitDataset(full, train_idx, test_idx)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``test_fraction`` share goes to test (at least one per class
    when the class has two or more samples). Returns sorted (train, test) indices."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(idx))
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_model_range(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """(N, C, H, W) floats in [0, 1] → resized (N, channels, size, size) floats in [-1, 1]."""
    if channels and images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise DataError(f"cannot convert {images.shape[1]}-channel images to {channels}")
    if images.shape[-2:] != (size, size):
        antialias = images.shape[-1] > size
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
    return (images.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def _load_digits(cfg: DataConfig) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    names = tuple(str(n) for n in digits.target_names)
    return ImageData(to_model_range(images, cfg.image_size, cfg.channels), labels, names)


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def fashion_mnist_dirs() -> list[Path]:
    """Where ``data.dataset = "fashion-mnist"`` looks when ``data.path`` is empty: where
    ``make install`` puts the files, then Debian's ``dataset-fashion-mnist`` package."""
    return [Path(sys.prefix) / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]


def _idx_folder(cfg: DataConfig) -> Path:
    if cfg.path:
        folder = Path(cfg.path).expanduser()
        if not folder.is_dir():
            raise DataError(f"IDX folder not found: {folder}")
        return folder
    for folder in fashion_mnist_dirs():
        if find_idx(folder, "train-images-idx3-ubyte"):
            return folder
    tried = " or ".join(str(p) for p in fashion_mnist_dirs())
    raise DataError(
        f"Fashion-MNIST not found in {tried}: run `make install`, or set data.path to its IDX files"
    )


def _load_idx(cfg: DataConfig) -> tuple[ImageData, int]:
    """IDX ``train-*`` files (and ``t10k-*``, the official test split, when present), vectorised."""
    folder = _idx_folder(cfg)
    train = read_pair(folder, "train")
    if train is None:
        raise DataError(f"{folder}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]")
    test = read_pair(folder, "t10k")
    images = train[0] if test is None else np.concatenate([train[0], test[0]])
    labels = train[1] if test is None else np.concatenate([train[1], test[1]])
    if images.dtype != np.uint8:
        raise DataError(f"{folder}: IDX images must be uint8, got {images.dtype}")
    num_classes = int(labels.max()) + 1
    names = FASHION_CLASSES if cfg.dataset == "fashion-mnist" else tuple(str(i) for i in range(num_classes))
    if num_classes > len(names):
        raise DataError(f"{folder}: labels up to {num_classes - 1} for {len(names)} Fashion-MNIST classes")
    x = torch.from_numpy(np.require(images, requirements="W")).unsqueeze(1).float().div_(255.0)
    data = ImageData(
        to_model_range(x, cfg.image_size, cfg.channels), torch.from_numpy(labels.astype(np.int64)), names
    )
    return data, 0 if test is None else len(test[1])


def _eight_bit(img: Image.Image) -> Image.Image:
    """Gray images of more than 8 bits as 8-bit "L", scaled by their depth (Pillow's own
    conversion clips 16-bit values at 255, saturating most pixels): 16-bit modes ÷ 257; 32-bit
    integers as 16-bit when any value exceeds 255; floats in [0, 1] × 255."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    x = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if x.size and x.max() <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0 if img.mode.startswith("I;16") or (x.size and x.max() > 255) else 1.0
    return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8), "L")


def _read_image(path: Path) -> Image.Image:
    """The image as its owner sees it: EXIF orientation applied, gray depth scaled to 8 bits."""
    try:
        with Image.open(path) as img:
            img.load()
            return _eight_bit(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable image {path}: {first_line(exc)}") from None


def _load_imagefolder(cfg: DataConfig) -> ImageData:
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class sub-folders in {root} (expected ROOT/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder has no images: {folder}")
        files.extend((p, label) for p in found)
    pictures = [_read_image(p) for p, _ in files]
    gray = all(img.mode in ("1", "L", "LA", "I", "I;16", "F") for img in pictures)
    channels = cfg.channels or (1 if gray else 3)
    mode = "L" if channels == 1 else "RGB"
    size = (cfg.image_size, cfg.image_size)
    arrays = [
        np.asarray(img.convert(mode).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        for img in pictures
    ]
    stacked = np.stack(arrays).reshape(len(arrays), cfg.image_size, cfg.image_size, -1)
    images = torch.from_numpy(stacked / 255.0).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    names = tuple(p.name for p in class_dirs)
    return ImageData(to_model_range(images, cfg.image_size, channels), labels, names)


def _npz_images(images: np.ndarray, path: Path) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{path}: 'images' must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1/3")
    if images.dtype == np.uint8:
        return torch.from_numpy(images.astype(np.float32) / 255.0)
    floats = images.astype(np.float32)
    if not np.isfinite(floats).all() or floats.min() < 0.0 or floats.max() > 1.0:
        raise DataError(f"{path}: float 'images' must be finite and in [0, 1] (or use uint8)")
    return torch.from_numpy(floats)


def _load_npz(cfg: DataConfig) -> ImageData:
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"unreadable npz file {path}: {first_line(exc)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive of images and labels")
    with archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {archive.files}")
        try:
            raw_images, raw_labels = archive["images"], archive["labels"]
            names = archive["class_names"] if "class_names" in archive.files else None
        except (ValueError, OSError, EOFError) as exc:  # object arrays (pickles) are refused
            raise DataError(f"unreadable npz file {path}: {first_line(exc)}") from None
    if len(raw_images) == 0:
        raise DataError(f"{path}: 'images' is empty")
    if len(raw_images) != len(raw_labels):
        raise DataError(f"{path}: {len(raw_images)} images but {len(raw_labels)} labels")
    if (
        raw_labels.ndim != 1
        or not np.issubdtype(raw_labels.dtype, np.integer)
        or (len(raw_labels) and raw_labels.min() < 0)
    ):
        raise DataError(f"{path}: 'labels' must be a 1-D array of non-negative integers")
    num_classes = int(raw_labels.max()) + 1 if len(raw_labels) else 0
    class_names = (
        tuple(str(n) for n in names) if names is not None else tuple(str(i) for i in range(num_classes))
    )
    if len(class_names) < num_classes:
        raise DataError(f"{path}: {len(class_names)} class_names for {num_classes} labels")
    images = _npz_images(raw_images, path)
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    return ImageData(to_model_range(images, cfg.image_size, cfg.channels), labels, class_names)

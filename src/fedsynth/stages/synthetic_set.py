"""A synthetic set on disk: where it may go, whether it fits, and its writer.

Layout: ``OUT/<class-name>/<class-name>_NNNNN.png`` plus ``OUT/manifest.json`` (loadable by
our ``imagefolder`` dataset and by Hugging Face ``datasets``' image-folder loader), or
``OUT/synthetic.npz`` (``images`` uint8, ``labels``, ``class_names``) plus the manifest.
:class:`SetWriter` writes either batch by batch, so generating a set takes the memory of one
batch whatever its size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedsynth.core.errors import ConfigError, RunDirError
from fedsynth.data.datasets import folder_name
from fedsynth.report.plots import to_uint8

UNLABELED = "unlabeled"
FORMATS = ("png", "npz")
BYTES_PER_PIXEL_IN_MEMORY = 5  # a loaded set: float32 images and their 8-bit copy


def check_output(out: Path, fmt: str) -> None:
    """A synthetic set goes to a new or empty folder or replaces an earlier synthetic set
    (:func:`is_synthetic_set`); never into a file or a folder holding anything else."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a folder for the synthetic set")
    if out.is_dir() and any(out.iterdir()) and not is_synthetic_set(out):
        raise RunDirError(
            f"{out} is not empty and holds no synthetic set (only a folder that is exactly a fedsynth "
            "synthetic set is replaced): choose a new folder"
        )


def _memory_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); elsewhere no limit is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 1 << 62


def check_fits(total: int, shape: tuple[int, ...], out: Path, *, loaded: bool = False) -> None:
    """Refuse, before generating anything, a synthetic set that cannot fit on disk (PNGs take at
    most their raw size) or, when it will be ``loaded`` whole (a run's evaluation), in memory."""
    pixels = int(np.prod(shape))
    memory, available = total * pixels * BYTES_PER_PIXEL_IN_MEMORY, _memory_available()
    if loaded and memory > available:
        raise ConfigError(
            f"{total:,} images of {tuple(shape)} need ~{memory / 1e9:.1f} GB of memory to be evaluated, "
            f"{available / 1e9:.1f} GB is available: draw fewer per class, or set eval.enabled = false "
            "(writing a set takes the memory of one batch)"
        )
    folder = next(p for p in (out, *out.parents) if p.exists())
    disk, free = total * (pixels + 256), shutil.disk_usage(folder).free
    if disk > free:
        raise RunDirError(
            f"{total:,} images need up to {disk / 1e9:.1f} GB on disk, {free / 1e9:.1f} GB is free at "
            f"{folder}: draw fewer per class"
        )


def is_synthetic_set(folder: Path) -> bool:
    """Whether ``folder`` is exactly what :class:`SetWriter` writes, and so may be replaced: a
    manifest naming its format and classes, then only ``synthetic.npz`` (npz) or only one folder
    of PNG files per class (png) — nothing else, no link."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not isinstance(manifest.get("class_names"), list):
        return False
    entries = {p.name: p for p in folder.iterdir()}
    if any(p.is_symlink() for p in entries.values()) or not (folder / "manifest.json").is_file():
        return False
    del entries["manifest.json"]
    if manifest.get("format") == "npz":
        return set(entries) <= {"synthetic.npz"} and all(p.is_file() for p in entries.values())
    if manifest.get("format") != "png":
        return False
    allowed = {folder_name(str(n)) for n in manifest["class_names"]} | {UNLABELED}
    return set(entries) <= allowed and all(_only_pngs(p) for p in entries.values())


def _only_pngs(folder: Path) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(p.suffix == ".png" and p.is_file() and not p.is_symlink() for p in folder.iterdir())


class NpzStream:
    """``synthetic.npz`` written batch by batch: the images stream into the zip's ``images.npy``
    (its header names the final shape up front), the labels into a temporary file copied in at
    the end. ``np.load`` reads it as it reads ``np.savez_compressed``'s files."""

    def __init__(self, path: Path, total: int, image_shape: tuple[int, ...], class_names: list[str]):
        self.class_names = class_names
        self.total, self.written = total, 0
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
        self.images = self.zip.open("images.npy", "w", force_zip64=True)
        _npy_header(self.images, np.uint8, (total, *image_shape))
        self.labels = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())

    def add(self, pics: np.ndarray, labels: np.ndarray) -> None:
        self.images.write(np.ascontiguousarray(pics).tobytes())
        self.labels.write(labels.astype("<i8").tobytes())
        self.written += len(pics)

    def close(self) -> None:
        if self.written != self.total:
            raise RuntimeError(f"npz stream: {self.written} images written, {self.total} announced")
        self.images.close()
        self.labels.seek(0)
        with self.zip.open("labels.npy", "w", force_zip64=True) as fh:
            _npy_header(fh, np.dtype("<i8"), (self.total,))
            shutil.copyfileobj(self.labels, fh)
        self.labels.close()
        with self.zip.open("class_names.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array(self.class_names))
        self.zip.close()


def _npy_header(fh, dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)


@dataclass(frozen=True)
class SetLayout:
    """What a synthetic set will hold: its classes, size, image shape (C, H, W) and format."""

    class_names: list[str]
    total: int
    image_shape: tuple[int, ...]
    fmt: str = "png"


class SetWriter:
    """A synthetic set of ``layout`` written into an empty ``folder`` one batch at a time,
    keeping the first ``keep`` images of each class (in [-1, 1]) for the sample grid. PNGs are
    numbered per class in the order they arrive."""

    def __init__(self, folder: Path, layout: SetLayout, keep: int = 0):
        self.folder, self.keep = folder, keep
        self.class_names, self.shape = layout.class_names, tuple(layout.image_shape)
        self.per_folder: dict[str, int] = {}
        self.per_class = np.zeros(len(self.class_names), dtype=np.int64)
        self.unlabeled = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.kept_per_class = np.zeros(max(len(self.class_names), 1), dtype=np.int64)
        self.npz = None
        if layout.fmt == "npz":
            c, h, w = self.shape
            hwc = (h, w) if c == 1 else (h, w, c)
            self.npz = NpzStream(folder / "synthetic.npz", layout.total, hwc, self.class_names)

    def add(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """One batch: ``images`` (n, C, H, W) in [-1, 1], ``labels`` class indices or None."""
        pics = to_uint8(images)
        pics = pics[..., 0] if pics.shape[-1] == 1 else pics
        if labels is None:
            self.unlabeled += len(pics)
        else:
            self.per_class += np.bincount(labels.numpy(), minlength=len(self.class_names))
        if self.npz is not None:
            self.npz.add(pics, np.full(len(pics), -1) if labels is None else labels.numpy())
        else:
            self._write_pngs(pics, labels)
        self._keep(images, labels)

    def _write_pngs(self, pics: np.ndarray, labels: torch.Tensor | None) -> None:
        for i, pic in enumerate(pics):
            name = UNLABELED if labels is None else folder_name(self.class_names[int(labels[i])])
            n = self.per_folder.get(name, 0)
            if n == 0:
                (self.folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pic).save(self.folder / name / f"{name}_{n:05d}.png")
            self.per_folder[name] = n + 1

    def _keep(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """The first ``keep`` images of each class (unlabeled: the first ``10 * keep``)."""
        if labels is None:
            take = list(range(min(len(images), self.keep * 10 - int(self.kept_per_class[0]))))
            self.kept_per_class[0] += len(take)
        else:
            take = []
            for i, y in enumerate(labels.tolist()):
                if self.kept_per_class[y] < self.keep:
                    self.kept_per_class[y] += 1
                    take.append(i)
        if take:
            kept_labels = None if labels is None else labels[take].clone()
            self.kept.append((images[take].detach().cpu().clone(), kept_labels))

    def close(self) -> None:
        if self.npz is not None:
            self.npz.close()

    @property
    def counts(self) -> dict[str, int]:
        """Images per class name (every class, zeros included), or per ``unlabeled``."""
        if self.unlabeled:
            return {UNLABELED: self.unlabeled}
        return {n: int(c) for n, c in zip(self.class_names, self.per_class, strict=True)}

    def grid_images(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept images (and labels), for the sample grid."""
        if not self.kept:
            return torch.empty(0, *self.shape), None
        images = torch.cat([x for x, _ in self.kept])
        return images, None if self.kept[0][1] is None else torch.cat([y for _, y in self.kept])

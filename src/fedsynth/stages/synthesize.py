"""Stage 3: generate a class-balanced synthetic dataset from a trained model.

Output (image-folder layout, loadable by our ``imagefolder`` dataset and by Hugging
Face ``datasets``' image-folder loader): ``OUT/<class-name>/<class-name>_NNNNN.png``
plus ``OUT/manifest.json``; or ``OUT/synthetic.npz`` (``images`` uint8, ``labels``,
``class_names``). Deterministic for a seed and batch size.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from fedsynth.config import Config
from fedsynth.core.errors import ConfigError, RunDirError
from fedsynth.core.progress import progress_bar
from fedsynth.core.rundir import write_dir_atomic, write_json_atomic
from fedsynth.core.seeding import torch_generator
from fedsynth.data.datasets import folder_name
from fedsynth.diffusion.latent import image_shape, to_images
from fedsynth.diffusion.sampling import generate
from fedsynth.diffusion.schedule import build_sampler
from fedsynth.diffusion.unet import null_label
from fedsynth.report.plots import plot_sample_grid, to_uint8

UNLABELED = "unlabeled"


@dataclass(frozen=True)
class SampleSpec:
    per_class: int
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 1.0
    batch_size: int = 250
    seed: int = 0

    @classmethod
    def of(cls, cfg: Config) -> SampleSpec:
        """The run's sampling settings (``sample.*`` and the run's seed)."""
        s = cfg.sample
        return cls(s.per_class, s.sampler, s.steps, s.guidance, s.batch_size, cfg.seed)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


def sample_images(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, num_classes: int, spec: SampleSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images in [-1, 1] on CPU, labels or None for an unconditional model)."""
    conditional = null_label(unet) is not None
    labels = balanced_labels(num_classes, spec.per_class) if conditional else None
    device = next(unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    return generate_for(unet, train_scheduler, labels, num_classes * spec.per_class, spec, generator), labels


def generate_for(
    unet: UNet2DModel,
    train_scheduler: DDPMScheduler,
    labels: torch.Tensor | None,
    total: int,
    spec: SampleSpec,
    generator: torch.Generator,
) -> torch.Tensor:
    """``total`` images (of ``labels`` when given) in batches of ``spec.batch_size``."""
    unet.eval()
    chunks = []
    with progress_bar(f"sampling {spec.sampler}-{spec.steps}", total=total) as bar:
        for start in range(0, total, spec.batch_size):
            stop = min(start + spec.batch_size, total)
            sampler = build_sampler(spec.sampler, train_scheduler, spec.steps)
            batch = generate(
                unet,
                sampler,
                None if labels is None else labels[start:stop],
                num_images=stop - start,
                guidance=spec.guidance,
                generator=generator,
            )
            chunks.append(to_images(unet, batch).cpu())
            bar.advance(stop - start)
    return torch.cat(chunks) if chunks else torch.empty(0)


def check_output(out: Path, fmt: str) -> None:
    """A synthetic set goes to a new or empty folder or replaces an earlier synthetic set
    (:func:`is_synthetic_set`); never into a file or a folder holding anything else."""
    if fmt not in ("png", "npz"):
        raise ConfigError(f"format {fmt!r} is not valid; choose one of: png, npz")
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


def check_fits(total: int, shape: tuple[int, ...], out: Path) -> None:
    """Refuse, before generating anything, a synthetic set that cannot fit: the images are held
    in memory as float32 (with their 8-bit copy) and written as PNGs (at most their raw size)."""
    pixels = int(np.prod(shape))
    memory, available = total * pixels * 5, _memory_available()
    if memory > available:
        raise ConfigError(
            f"{total:,} images of {tuple(shape)} need ~{memory / 1e9:.1f} GB of memory, "
            f"{available / 1e9:.1f} GB is available: draw fewer per class (or several sets)"
        )
    folder = next(p for p in (out, *out.parents) if p.exists())
    disk, free = total * (pixels + 256), shutil.disk_usage(folder).free
    if disk > free:
        raise RunDirError(
            f"{total:,} images need up to {disk / 1e9:.1f} GB on disk, {free / 1e9:.1f} GB is free at "
            f"{folder}: draw fewer per class"
        )


def is_synthetic_set(folder: Path) -> bool:
    """Whether ``folder`` is exactly what :func:`write_synthetic` writes, and so may be replaced:
    a manifest naming its format and classes, then only ``synthetic.npz`` (npz) or only one
    folder of PNG files per class (png) — nothing else, no link."""
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


def write_imagefolder(
    images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], out: Path
) -> dict[str, int]:
    pics = to_uint8(images)
    counts: dict[str, int] = {}
    for i, pic in enumerate(pics):
        name = folder_name(class_names[int(labels[i])]) if labels is not None else UNLABELED
        folder = out / name
        if name not in counts:
            folder.mkdir(parents=True, exist_ok=True)
        n = counts.get(name, 0)
        Image.fromarray(pic[..., 0] if pic.shape[-1] == 1 else pic).save(folder / f"{name}_{n:05d}.png")
        counts[name] = n + 1
    return counts


def write_npz(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pics = to_uint8(images)
    np.savez_compressed(
        out / "synthetic.npz",
        images=pics[..., 0] if pics.shape[-1] == 1 else pics,
        labels=(labels if labels is not None else torch.full((len(pics),), -1)).numpy(),
        class_names=np.array(class_names),
    )


def write_grid(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    class_names: list[str],
    path: Path,
    per_row: int,
    title: str = "",
) -> None:
    if labels is None:
        rows = [images[i : i + per_row] for i in range(0, min(len(images), per_row * 10), per_row)]
        names = [""] * len(rows)
    else:
        rows = [images[labels == c][:per_row] for c in range(len(class_names))]
        names = class_names
    plot_sample_grid(rows, names, path, title)


def synthesize(
    unet: UNet2DModel,
    train_scheduler: DDPMScheduler,
    class_names: list[str],
    spec: SampleSpec,
    out: Path,
    *,
    fmt: str = "png",
    model_round: int | None = None,
    grid: Path | None = None,
    grid_per_row: int = 10,
    grid_title: str = "",
) -> dict:
    """Generate, write the dataset and its manifest (and a sample grid PNG when ``grid``
    is given, drawn from the same images); return the manifest."""
    check_output(out, fmt)
    check_fits(len(class_names) * spec.per_class, image_shape(unet), out)
    images, labels = sample_images(unet, train_scheduler, len(class_names), spec)
    extra = {"model_round": model_round}
    return write_synthetic(images, labels, class_names, spec, out, fmt, extra, grid, grid_per_row, grid_title)


def mixture_labels(row) -> torch.Tensor:
    """Class labels for ``row[c]`` images of each class c, in class order."""
    return torch.repeat_interleave(torch.arange(len(row)), torch.as_tensor(row, dtype=torch.long))


def generate_share(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, row, spec: SampleSpec, client_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's share of a mixture: ``row[c]`` images of class c from ``unet``, with the
    noise stream ``derive(seed, "mixture", client_id)`` (the same on the server and the client)."""
    labels = mixture_labels(row)
    generator = torch_generator(spec.seed, "mixture", client_id, device=next(unet.parameters()).device)
    return generate_for(unet, train_scheduler, labels, len(labels), spec, generator), labels


def synthesize_mixture(
    models: dict[int, UNet2DModel],
    train_scheduler: DDPMScheduler,
    counts: np.ndarray,
    class_names: list[str],
    spec: SampleSpec,
    out: Path,
    *,
    grid: Path | None = None,
    grid_per_row: int = 10,
    grid_title: str = "",
) -> dict:
    """A synthetic set drawn from several models: ``counts[i, c]`` images of class c from the
    i-th model (``models`` in key order); each model's noise from ``derive(seed, "mixture", id)``."""
    check_output(out, "png")
    shares = [
        generate_share(unet, train_scheduler, row, spec, pid)
        for (pid, unet), row in zip(sorted(models.items()), counts, strict=True)
    ]
    return write_mixture(
        dict(zip(sorted(models), shares, strict=True)), class_names, spec, out, grid, grid_per_row, grid_title
    )


def write_mixture(
    shares: dict[int, tuple[torch.Tensor, torch.Tensor]],
    class_names: list[str],
    spec: SampleSpec,
    out: Path,
    grid: Path | None = None,
    grid_per_row: int = 10,
    grid_title: str = "",
    extra: dict | None = None,
) -> dict:
    """Write the clients' shares (images, labels) as one synthetic set, ordered by class."""
    images = [shares[p][0] for p in sorted(shares)]
    labels = [shares[p][1] for p in sorted(shares)]
    counts = [np.bincount(shares[p][1].numpy(), minlength=len(class_names)) for p in sorted(shares)]
    order = torch.argsort(torch.cat(labels), stable=True)  # by class, then by client
    extra = {
        **(extra or {}),
        "mixture": {str(pid): [int(x) for x in row] for pid, row in zip(sorted(shares), counts, strict=True)},
    }
    all_images, all_labels = torch.cat(images)[order], torch.cat(labels)[order]
    return write_synthetic(
        all_images, all_labels, class_names, spec, out, "png", extra, grid, grid_per_row, grid_title
    )


def write_synthetic(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    class_names: list[str],
    spec: SampleSpec,
    out: Path,
    fmt: str,
    extra: dict,
    grid: Path | None,
    grid_per_row: int,
    grid_title: str,
) -> dict:
    """Write ``out`` (replacing an earlier synthetic set whole) with its manifest, and the grid."""
    check_output(out, fmt)
    if labels is None:
        counts = {UNLABELED: len(images)}
    else:
        counts = {n: int((labels == i).sum()) for i, n in enumerate(class_names)}
    manifest = {
        "format": fmt,
        "counts": counts,
        "total": len(images),
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        **extra,
        "image_shape": list(images.shape[1:]),
        "class_names": class_names,
    }

    def fill(tmp: Path) -> None:
        if fmt == "png":
            write_imagefolder(images, labels, class_names, tmp)
        else:
            write_npz(images, labels, class_names, tmp)
        write_json_atomic(tmp / "manifest.json", manifest)

    write_dir_atomic(out, fill)  # no stale images from an earlier set
    if grid is not None:
        write_grid(images, labels, class_names, grid, per_row=grid_per_row, title=grid_title)
    return manifest

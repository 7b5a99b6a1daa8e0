"""Stage 3: generate a class-balanced synthetic dataset from a trained model.

Generation runs batch by batch into :class:`~fedsynth.stages.synthetic_set.SetWriter` (the
set's layout and checks live there), so a set of any size takes the memory of one batch.
Deterministic for a seed and batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedsynth.config import Config
from fedsynth.core.progress import progress_bar
from fedsynth.core.rundir import write_dir_atomic, write_json_atomic
from fedsynth.core.seeding import torch_generator
from fedsynth.diffusion.latent import image_shape, to_images
from fedsynth.diffusion.sampling import generate
from fedsynth.diffusion.schedule import build_sampler
from fedsynth.diffusion.unet import null_label
from fedsynth.report.plots import plot_sample_grid
from fedsynth.stages.synthetic_set import SetLayout, SetWriter, check_fits, check_output

Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]  # (images in [-1, 1], labels or None)


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


def balanced_batches(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, num_classes: int, spec: SampleSpec
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``spec.per_class`` images of every class (none for an unconditional model), batch by batch."""
    conditional = null_label(unet) is not None
    labels = balanced_labels(num_classes, spec.per_class) if conditional else None
    device = next(unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    return generate_batches(unet, train_scheduler, labels, num_classes * spec.per_class, spec, generator)


def sample_images(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, num_classes: int, spec: SampleSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images in [-1, 1] on CPU, labels or None for an unconditional model), held in memory."""
    return _joined(balanced_batches(unet, train_scheduler, num_classes, spec))


def generate_batches(
    unet: UNet2DModel,
    train_scheduler: DDPMScheduler,
    labels: torch.Tensor | None,
    total: int,
    spec: SampleSpec,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``total`` images (of ``labels`` when given) in batches of ``spec.batch_size``, on CPU."""
    unet.eval()
    with progress_bar(f"sampling {spec.sampler}-{spec.steps}", total=total) as bar:
        for start in range(0, total, spec.batch_size):
            stop = min(start + spec.batch_size, total)
            sampler = build_sampler(spec.sampler, train_scheduler, spec.steps)
            chunk = None if labels is None else labels[start:stop]
            batch = generate(
                unet, sampler, chunk, num_images=stop - start, guidance=spec.guidance, generator=generator
            )
            yield to_images(unet, batch).cpu(), chunk
            bar.advance(stop - start)


def _joined(batches: Batches) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = list(batches)
    if not parts:
        return torch.empty(0), None
    images = torch.cat([x for x, _ in parts])
    return images, None if parts[0][1] is None else torch.cat([y for _, y in parts])


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
    """Generate and write the dataset and its manifest batch by batch (and a sample grid PNG
    when ``grid`` is given, drawn from the same images); return the manifest."""
    check_output(out, fmt)
    layout = SetLayout(class_names, len(class_names) * spec.per_class, image_shape(unet), fmt)
    check_fits(layout.total, layout.image_shape, out)
    batches = balanced_batches(unet, train_scheduler, len(class_names), spec)
    extra = {"model_round": model_round}
    return write_synthetic(batches, layout, spec, out, extra, SampleGrid(grid, grid_per_row, grid_title))


def mixture_labels(row) -> torch.Tensor:
    """Class labels for ``row[c]`` images of each class c, in class order."""
    return torch.repeat_interleave(torch.arange(len(row)), torch.as_tensor(row, dtype=torch.long))


def share_batches(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, row, spec: SampleSpec, client_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One client's share of a mixture, batch by batch: ``row[c]`` images of class c from
    ``unet``, with the noise stream ``derive(seed, "mixture", client_id)`` (the same on the
    server and the client)."""
    labels = mixture_labels(row)
    generator = torch_generator(spec.seed, "mixture", client_id, device=next(unet.parameters()).device)
    return generate_batches(unet, train_scheduler, labels, len(labels), spec, generator)


def generate_share(
    unet: UNet2DModel, train_scheduler: DDPMScheduler, row, spec: SampleSpec, client_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`share_batches` held in memory (a client uploads its share whole)."""
    images, labels = _joined(share_batches(unet, train_scheduler, row, spec, client_id))
    return images, labels if labels is not None else mixture_labels(row)


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
    i-th model (``models`` in key order); each model's noise from ``derive(seed, "mixture", id)``.
    Each class's images come in model order."""
    check_output(out, "png")
    order = sorted(models)
    layout = SetLayout(class_names, int(counts.sum()), image_shape(models[order[0]]), "png")
    check_fits(layout.total, layout.image_shape, out)
    batches = (
        batch
        for pid, row in zip(order, counts, strict=True)
        for batch in share_batches(models[pid], train_scheduler, row, spec, pid)
    )
    extra = {"mixture": _mixture_counts(order, counts)}
    return write_synthetic(batches, layout, spec, out, extra, SampleGrid(grid, grid_per_row, grid_title))


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
    """Write the clients' shares (images, labels) as one synthetic set; each class's images
    come in client order."""
    order = sorted(shares)
    counts = np.stack([np.bincount(shares[p][1].numpy(), minlength=len(class_names)) for p in order])
    shape = tuple(shares[order[0]][0].shape[1:])
    layout = SetLayout(class_names, int(counts.sum()), shape, "png")
    extra = {**(extra or {}), "mixture": _mixture_counts(order, counts)}
    batches = (shares[p] for p in order)
    return write_synthetic(batches, layout, spec, out, extra, SampleGrid(grid, grid_per_row, grid_title))


def _mixture_counts(order: list[int], counts: np.ndarray) -> dict[str, list[int]]:
    return {str(pid): [int(x) for x in row] for pid, row in zip(order, counts, strict=True)}


@dataclass(frozen=True)
class SampleGrid:
    """Where the sample grid goes (None: no grid), images per class row, and its title."""

    path: Path | None = None
    per_row: int = 10
    title: str = ""


def write_synthetic(
    batches: Batches,
    layout: SetLayout,
    spec: SampleSpec,
    out: Path,
    extra: dict,
    grid: SampleGrid = SampleGrid(),
) -> dict:
    """Write ``out`` (replacing an earlier synthetic set whole) from ``batches`` as they come,
    with its manifest, then the grid."""
    check_output(out, layout.fmt)
    names = layout.class_names
    written: dict = {}

    def fill(tmp: Path) -> None:
        writer = SetWriter(tmp, layout, keep=grid.per_row)
        for images, labels in batches:
            writer.add(images, labels)
        writer.close()
        written["writer"] = writer
        manifest = _manifest(layout, spec, extra, writer.counts)
        write_json_atomic(tmp / "manifest.json", manifest)
        written["manifest"] = manifest

    write_dir_atomic(out, fill)  # no stale images from an earlier set
    if grid.path is not None:
        images, labels = written["writer"].grid_images()
        write_grid(images, labels, names, grid.path, per_row=grid.per_row, title=grid.title)
    return written["manifest"]


def _manifest(layout: SetLayout, spec: SampleSpec, extra: dict, counts: dict[str, int]) -> dict:
    return {
        "format": layout.fmt,
        "counts": counts,
        "total": sum(counts.values()),
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        **extra,
        "image_shape": list(layout.image_shape),
        "class_names": layout.class_names,
    }

"""PNG figures: partition heat-map, sample grid, training curves."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fedsynth.core.rundir import write_bytes_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) → uint8 (N, H, W, C)."""
    x = ((images.detach().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_figure(fig, path: Path) -> None:
    """A figure as PNG, written as a new file (never through a link standing at ``path``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())


def plot_partition_heatmap(hist: np.ndarray, class_names: list[str], path: Path) -> None:
    clients, classes = hist.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * classes, 1.0 + 0.4 * clients))
    im = ax.imshow(hist, cmap="viridis", aspect="auto")
    ax.set_xticks(range(classes), class_names, rotation=90 if classes > 12 else 0)
    ax.set_yticks(range(clients), [f"client {k}" for k in range(clients)])
    ax.set_xlabel("class")
    if clients * classes <= 400:
        for (k, c), v in np.ndenumerate(hist):
            ax.text(
                c,
                k,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < hist.max() / 2 else "black",
            )
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_title("samples per client and class")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_sample_grid(rows: list[torch.Tensor], row_names: list[str], path: Path, title: str = "") -> None:
    """One row of images per class (each a (n, C, H, W) tensor in [-1, 1])."""
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(0.8 * cols + 0.8, 0.8 * len(rows) + 0.4), squeeze=False
    )
    for i, (imgs, name) in enumerate(zip(rows, row_names, strict=True)):
        pics = to_uint8(imgs) if len(imgs) else []
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(pics):
                pic = pics[j]
                ax.imshow(pic[..., 0] if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=255)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_curve(
    xs: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, path: Path, title: str = ""
) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_tsne(figures: dict, class_names: list[str], path: Path, points: int, seed: int) -> None:
    """Real vs synthetic features in 2-D (t-SNE), coloured by class (Senden 2025's Figure 3)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)

    def pick(feats, ys):
        idx = rng.permutation(len(feats))[:points]
        return feats[idx], ys[idx]

    rf, ry = pick(figures["real_feats"], figures["real_y"])
    ff, fy = pick(figures["fake_feats"], figures["fake_y"])
    xy = TSNE(
        n_components=2, random_state=seed, init="pca", perplexity=min(30, len(rf) + len(ff) - 1)
    ).fit_transform(np.vstack([rf, ff]))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    n = len(rf)
    for c, name in enumerate(class_names):
        color = cmap(c % cmap.N)
        ax.scatter(*xy[:n][ry == c].T, s=10, color=color, marker="o", alpha=0.6, label=f"{name}")
        ax.scatter(*xy[n:][fy == c].T, s=14, color=color, marker="x", alpha=0.8)
    ax.set_title("t-SNE of classifier features: o real test, x synthetic")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, ncol=2, markerscale=1.5)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_bars(
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    path: Path,
    title: str = "",
    reference: float | None = None,
) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) * max(1, len(series))), 3.5))
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(
        x, labels, rotation=30 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center"
    )
    ax.set_ylabel(ylabel)
    if len(series) > 1 or reference is not None:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

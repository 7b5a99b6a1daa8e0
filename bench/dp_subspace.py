"""How much of the private gradient a public gradient subspace holds (``privacy.public_subspace``).

At the public model (``bench/privacy.py``'s ``pub-`` start, Fashion-MNIST at 16×16) with only
``--trainable`` training: per-example gradients of ``--examples`` public (Fashion-MNIST) and
private (digits) training images, one (t, ε) draw each. V_k = the top-k right singular vectors
of the public ones. For each k: the share of the squared norm of the digits' mean gradient and
of their mean unit gradient (the mean clipped gradient when C is below every example's norm, as
at C = 0.005) that lies in V_k's span, the median share of one example's, the share of the class
contrasts (each class's mean unit gradient minus the overall one: what tells the classes apart),
and the noise norm ratio √(P/k) that projecting onto V_k buys. The same shares for the digits'
own top-k directions (not private: a bound on what any k-dimensional subspace could hold).
Results: bench/results/dp_subspace/dp_subspace.{json,md}.

    .venv/bin/python bench/dp_subspace.py [--examples 1024] [--ks 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers import UNet2DModel

from _common import result_file, write_result
from fedsynth.config import DataConfig, DiffusionConfig, PrivacyConfig, TrainConfig
from fedsynth.data.datasets import ImageData, load_dataset
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import trainable_parameters
from fedsynth.diffusion.unet import init_folder
from fedsynth.privacy.dpsgd import PrivateGradients

PUBLIC_MODEL = Path("runs/bench-privacy/public-fashion16")
PATH = "class_embedding,time_embedding,*.time_emb_proj"


def gradients(
    unet: UNet2DModel, data: ImageData, examples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of the trainable parameters, one row per example (no label dropout),
    and the examples' labels."""
    diffusion = DiffusionConfig(cfg_dropout=0.0)
    private = PrivateGradients(
        unet, build_train_scheduler(diffusion), data, train=TrainConfig(), diffusion=diffusion,
        privacy=PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:examples]
    grads, _ = private.per_example(idx)
    return torch.cat([g.flatten(1) for g in grads], 1), data.labels[idx]


def class_contrast(unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each class's mean unit gradient minus the mean over all examples, one row per class: the
    part of the clipped signal that tells the classes apart."""
    mean = unit.mean(0)
    return torch.stack([unit[labels == c].mean(0) - mean for c in labels.unique()])


def contrast_share(contrast: torch.Tensor, basis: torch.Tensor) -> float:
    """The part of the class contrasts' total squared norm in V's span."""
    return float((contrast @ basis).square().sum() / contrast.square().sum())


def share(g: torch.Tensor, basis: torch.Tensor) -> float:
    """‖Vᵀg‖² / ‖g‖²: the part of g's squared norm in V's span."""
    return float((basis.T @ g).square().sum() / g.square().sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--ks", default="16,64,256,1024")
    p.add_argument("--trainable", default=PATH)
    args = p.parse_args()
    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(init_folder(PUBLIC_MODEL))
    trainable_parameters(unet, args.trainable)
    load = lambda name: load_dataset(DataConfig(dataset=name, image_size=16)).train  # noqa: E731
    public, _ = gradients(unet, load("fashion-mnist"), args.examples, seed=1)
    private, labels = gradients(unet, load("digits"), args.examples, seed=2)
    unit = private / private.norm(dim=1, keepdim=True)
    contrast = class_contrast(unit, labels)
    public_v = torch.linalg.svd(public, full_matrices=False)[2].T
    own_v = torch.linalg.svd(private, full_matrices=False)[2].T
    rows = []
    for k in map(int, args.ks.split(",")):
        v, own = public_v[:, :k], own_v[:, :k]
        rows.append({
            "k": k,
            "mean_gradient": share(private.mean(0), v),
            "mean_unit_gradient": share(unit.mean(0), v),
            "median_example": float((unit @ v).square().sum(1).median()),
            "class_contrast": contrast_share(contrast, v),
            "own_mean_unit_gradient": share(unit.mean(0), own),
            "own_class_contrast": contrast_share(contrast, own),
            "noise_norm_ratio": math.sqrt(public.shape[1] / k),
        })  # fmt: skip
        print(rows[-1], flush=True)
    alignment, contrast_norm = float(unit.mean(0).norm()), float(contrast.norm(dim=1).mean())
    write_result(
        "dp_subspace",
        {"trainable": args.trainable, "parameters": public.shape[1], "examples": args.examples,
         "mean_unit_norm": alignment, "class_contrast_norm": contrast_norm, "rows": rows},
    )  # fmt: skip
    lines = [
        "# Public gradient subspaces (`bench/dp_subspace.py`)\n",
        f"Public model `{PUBLIC_MODEL}`, trainable `{args.trainable}` (P = {public.shape[1]:,}); "
        f"{args.examples} Fashion-MNIST (public) and digits (private) training images, one (t, ε) draw "
        f"each. Norm of the digits' mean unit gradient: {alignment:.3f}; of a class contrast (a class's "
        f"mean unit gradient minus the overall one), on average: {contrast_norm:.3f}. Shares of squared "
        "norm in the span of the top k public directions (last two columns: the digits' own top k, not "
        "private).\n",
        "| k | noise norm ÷ | mean gradient | mean unit gradient | median example | class contrasts "
        "| digits' own k: mean unit | digits' own k: class contrasts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['k']} | {r['noise_norm_ratio']:.1f} | {r['mean_gradient']:.3f} "
            f"| {r['mean_unit_gradient']:.3f} | {r['median_example']:.3f} | {r['class_contrast']:.3f} "
            f"| {r['own_mean_unit_gradient']:.3f} | {r['own_class_contrast']:.3f} |"
            for r in rows
        ),
    ]
    (result_file("dp_subspace", ".md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

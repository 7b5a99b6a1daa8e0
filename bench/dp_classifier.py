"""The task-specific anchor for the privacy table: the CAS classifier (``SmallCNN``) trained
directly on the real digits with DP-SGD, at the same ε, δ and accountant as ``bench/privacy.py``.

DPDM (Dockhorn et al. 2023) compares classifiers trained on DP synthetic data with classifiers
trained with DP-SGD on the sensitive data itself; this is that comparison on our data: the
1,438 training digits at 16×16 (the runs' split), judged on the same real test split as CAS.
One fixed setting, chosen before looking at the test split and not tuned on it (DPImageBench's
warning): batch 256 with Poisson sampling, 40 epochs (240 steps), Adam lr 3e-3, C = 1, σ
calibrated by fedsynth's own accountant (``privacy.accounting.calibrate``, RDP, δ = 1/(10 N));
Opacus computes the per-example gradients and reports the ε it spent as a cross-check. ε = ∞
is the same training without clipping or noise. Results: bench/results/dp_classifier/dp_classifier.{json,md}.

    .venv/bin/python bench/dp_classifier.py [--epsilons inf,10,1] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _common import result_file, write_result
from fedsynth.config import DataConfig
from fedsynth.data.datasets import ImageData, load_dataset
from fedsynth.evaluation.classifier import SmallCNN, predict
from fedsynth.privacy.accounting import calibrate

BATCH, EPOCHS, LR, CLIP = 256, 40, 3e-3, 1.0


def train(data: ImageData, eps: float, seed: int) -> tuple[SmallCNN, dict]:
    """SmallCNN on ``data`` with DP-SGD at ``eps`` (math.inf: no clipping, no noise)."""
    torch.manual_seed(seed)
    model = SmallCNN(data.shape[0], data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(
        TensorDataset(data.images, data.labels), batch_size=BATCH, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    steps = EPOCHS * len(loader)
    delta = 1 / (10 * len(data))
    info: dict = {"steps": steps, "delta": delta, "noise_multiplier": None, "epsilon_opacus": None}
    engine = None
    if math.isfinite(eps):
        # Opacus' Poisson loader samples at q = 1 / len(loader) for len(loader) batches an epoch
        sigma = calibrate(eps, delta, 1 / len(loader), steps, "rdp")
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=CLIP, poisson_sampling=True,
        )  # fmt: skip
        info["noise_multiplier"] = sigma
    model.train()
    for _ in range(EPOCHS):
        for images, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    if engine is not None:
        info["epsilon_opacus"] = engine.get_epsilon(delta)
        model = model._module
    return model.eval(), info


def table(rows: list[dict]) -> str:
    lines = [
        "| target ε | seed | σ | ε spent (Opacus' RDP, δ) | test accuracy | train s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        spent = "∞" if r["epsilon_opacus"] is None else f"{r['epsilon_opacus']:.2f} ({r['delta']:.1e})"
        lines.append(
            f"| {r['target_epsilon']} | {r['seed']} | {sigma} | {spent} | {100 * r['accuracy']:.1f}% "
            f"| {r['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


HEADER = (
    "# A classifier trained with DP-SGD on the real digits (`bench/dp_classifier.py`)\n\n"
    "The task-specific anchor of `bench/results/privacy/privacy.md` (DPDM's comparison): `SmallCNN`, the CAS "
    "classifier, trained on the 1,438 real training digits (16×16) with DP-SGD and tested on the "
    "real test split that CAS uses. One fixed setting, not tuned on the test split: Poisson batches "
    f"(Opacus' loader built on batches of {BATCH}: q = 1/6, 240 images on average), {EPOCHS} epochs, "
    f"Adam lr {LR:g}, C = {CLIP:g}, σ from fedsynth's RDP accountant at δ = 1/(10 N); ε = ∞ is the "
    "same training without DP.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epsilons", default="inf,10,1")
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args()
    data = load_dataset(DataConfig(dataset="digits", image_size=16))
    rows = []
    for eps in args.epsilons.split(","):
        for seed in map(int, args.seeds.split(",")):
            start = time.perf_counter()
            model, info = train(data.train, float(eps), seed)
            logits, _ = predict(model, data.test.images)
            accuracy = float((logits.argmax(1) == data.test.labels).float().mean())
            rows.append(
                {"target_epsilon": eps, "seed": seed, "accuracy": accuracy,
                 "train_s": round(time.perf_counter() - start, 1), **info}
            )  # fmt: skip
            print(rows[-1], flush=True)
    write_result(
        "dp_classifier", {"rows": rows, "setting": {"batch": BATCH, "epochs": EPOCHS, "lr": LR, "clip": CLIP}}
    )
    (result_file("dp_classifier", ".md")).write_text(HEADER + table(rows))


if __name__ == "__main__":
    main()

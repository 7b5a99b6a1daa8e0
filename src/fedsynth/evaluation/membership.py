"""Empirical privacy audit: a loss-threshold membership-inference attack on the model.

The attacker scores each image by −ℓ(x), the diffusion loss of the trained model at fixed
timesteps with fixed noise (Carlini et al. 2023 use this loss at t ≈ 100 for their
threshold attack; lower loss ⇒ "member"). Members: images of the training split (what the
parties trained on); non-members: the held-out test split. Reported: ROC AUC (0.5 = no
better than chance) and the true-positive rate at 1% false positives, the regime that
matters for individual records (Carlini et al. 2022).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.metrics import roc_auc_score, roc_curve

from fedsynth.core.seeding import numpy_rng, torch_generator
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.latent import model_space
from fedsynth.diffusion.unet import null_label

TIMESTEPS = (25, 50, 100, 200)


@torch.no_grad()
def loss_scores(
    unet: UNet2DModel, scheduler: DDPMScheduler, data: ImageData, seed: int, part: int, batch_size: int = 256
) -> np.ndarray:
    """Per image: the mean ‖ε − ε_θ(x_t, t, y)‖² over :data:`TIMESTEPS`, one seeded ε each
    (``part`` tells members from non-members in the seed derivation)."""
    device = next(unet.parameters()).device
    num_t = scheduler.config.num_train_timesteps
    steps = [t * num_t // 1000 for t in TIMESTEPS]  # the same noise levels for any T
    null = null_label(unet)
    images = model_space(unet, data.images)  # a latent denoiser's: the VAE latents
    out = []
    for start in range(0, len(data), batch_size):
        x0 = images[start : start + batch_size].to(device)
        y = None if null is None else data.labels[start : start + batch_size].to(device)
        total = torch.zeros(len(x0), device=device)
        for t in steps:
            gen = torch_generator(seed, "membership", part, start, t, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
            pred = unet(scheduler.add_noise(x0, noise, tt), tt, class_labels=y).sample
            total += ((pred - noise) ** 2).flatten(1).mean(1)
        out.append((total / len(steps)).cpu())
    return torch.cat(out).numpy()


def attack_scores(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 1% FPR of the score −loss (members labelled 1)."""
    y = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    score = -np.r_[member_loss, nonmember_loss]
    fpr, tpr, _ = roc_curve(y, score)
    return {
        "mia_auc": float(roc_auc_score(y, score)),
        "mia_tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
    }


def class_matched(members: ImageData, pool: ImageData, seed: int) -> tuple[ImageData, ImageData]:
    """Members and non-members (from ``pool``) with the same count per class: n_c = ⌊s·m_c⌋
    of each, s = min(1, min_c a_c / m_c) (m_c members and a_c pool images of class c). A
    client's model is attacked on its own classes only; against the whole test split its loss
    on classes it never saw would tell members apart by class, not by membership."""
    rng = numpy_rng(seed, "membership-classes")
    m_labels, p_labels = members.labels.numpy(), pool.labels.numpy()
    classes, counts = np.unique(m_labels, return_counts=True)
    scale = min(1.0, *(np.sum(p_labels == c) / m for c, m in zip(classes, counts, strict=True)))
    take = {int(c): int(scale * m) for c, m in zip(classes, counts, strict=True)}

    def draw(labels: np.ndarray) -> np.ndarray:
        picks = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in take.items()]
        return np.sort(np.concatenate(picks))

    return members.subset(draw(m_labels)), pool.subset(draw(p_labels))


def membership_audit(
    unet: UNet2DModel, scheduler: DDPMScheduler, members: ImageData, nonmembers: ImageData, n: int, seed: int
) -> dict[str, float]:
    """The attack on up to ``n`` members and ``n`` non-members drawn with ``seed``."""
    rng = numpy_rng(seed, "membership")
    k = min(n, len(members), len(nonmembers))
    m = members.subset(rng.choice(len(members), k, replace=False))
    o = nonmembers.subset(rng.choice(len(nonmembers), k, replace=False))
    result = attack_scores(loss_scores(unet, scheduler, m, seed, 0), loss_scores(unet, scheduler, o, seed, 1))
    return {**result, "mia_samples": k}

"""Client-level (user-level) DP for federated averaging: DP-FedAvg with fixed clipping
(McMahan et al. 2018; the server-side fixed clipping of Flower's
``DifferentialPrivacyServerSideFixedClipping``, made seedable and applied *before* the
server optimizer).

Notation: w the global weights sent, w_i client i's returned weights, Δ_i = w_i − w, m the
clients aggregated this round, C = ``privacy.max_grad_norm``, σ = ``privacy.noise_multiplier``.

1. Clip: Δ̄_i = Δ_i · min(1, C / ‖Δ_i‖) (the norm over every uploaded tensor).
2. Mean and noise: w̃ = w + (1/m) Σ_i Δ̄_i + N(0, (σC/m)² I) — the sensitivity of the
   mean to one client's update is C/m, as in Flower.
3. The configured strategy then treats w̃ as the only reply, so its server optimizer
   (FedAvgM momentum, FedAdam moments) sees only the noised mean: every released model is
   post-processing of private aggregates. (Flower's wrapper adds the noise after the
   strategy, which is private only for plain FedAvg.)

Accounting: one Gaussian mechanism per round with noise multiplier σ and no amplification
by client sampling (sampling rate 1: clients are drawn m of n without replacement, which
the Poisson-sampling accountants do not cover).
"""

from __future__ import annotations

import torch

Weights = dict[str, torch.Tensor]


def clip_update(weights: Weights, reference: Weights, clip: float) -> Weights:
    """Step 1: Δ_i scaled to norm at most C."""
    delta = {k: weights[k].float() - reference[k].float() for k in weights}
    norm = torch.sqrt(sum((d**2).sum() for d in delta.values()))
    scale = min(1.0, clip / (float(norm) + 1e-12))
    return {k: d * scale for k, d in delta.items()}


def noised_mean(
    updates: list[Weights],
    reference: Weights,
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> Weights:
    """Step 2: w + mean of the clipped Δ_i + N(0, (σC/m)²)."""
    m = len(updates)
    clipped = [clip_update(w, reference, clip) for w in updates]
    std = noise_multiplier * clip / m
    out = {}
    for k in updates[0]:
        mean = torch.stack([c[k] for c in clipped]).mean(0)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        out[k] = (reference[k].float() + mean + std * noise).to(reference[k].dtype)
    return out

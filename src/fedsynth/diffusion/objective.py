"""The DDPM training objective (Ho et al. 2020, Eq. 14, "simple" loss).

Code name → paper symbol: ``x0`` → x₀, ``noise`` → ε, ``t`` → t,
``alphas_cumprod[t]`` → ᾱ_t, ``noisy`` → x_t, ``pred`` → ε_θ(x_t, t, y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

LOSSES = {
    "mse": lambda pred, target: F.mse_loss(pred, target),
    "huber": lambda pred, target: F.smooth_l1_loss(pred, target, beta=1.0),
}


def drop_labels(labels: torch.Tensor, p: float, null: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null`` with probability ``p`` (classifier-free guidance)."""
    if p <= 0.0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    *,
    loss: str = "mse",
) -> torch.Tensor:
    """L = E_{t, ε} ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, y)‖² (or Huber)."""
    noisy, t, noise = noisy_inputs(scheduler, x0, generator)
    # 3. ε_θ(x_t, t, y) and the regression loss against ε
    pred = unet(noisy, t, class_labels=labels).sample
    return LOSSES[loss](pred, noise)


def noisy_inputs(
    scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–2 of the objective: (x_t, t, ε)."""
    # 1. t ~ U{0, …, T−1}, ε ~ N(0, I)
    num_t = scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    # 2. x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε
    return scheduler.add_noise(x0, noise, t), t, noise

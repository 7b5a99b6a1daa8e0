"""Reverse diffusion: generate images for given class labels.

With guidance scale w and a class-conditional model, the noise estimate is
ε̃ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, y) − ε_θ(x_t, ∅))  (Ho & Salimans 2022);
w = 1 is plain conditional sampling (one forward pass per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fedsynth.diffusion.latent import PromptUNet
from fedsynth.diffusion.unet import null_label


def _guided_noise(
    unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    null = null_label(unet)
    if labels is None or null is None or guidance == 1.0:
        return unet(x, t, class_labels=labels).sample
    both = unet(
        torch.cat([x, x]),
        torch.cat([t, t]),
        class_labels=torch.cat([labels, torch.full_like(labels, null)]),
    ).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def generate(
    unet: UNet2DModel,
    sampler: SchedulerMixin,
    labels: torch.Tensor | None,
    *,
    num_images: int | None = None,
    guidance: float = 1.0,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Samples in the model's space, shape (N, C, H, W): images in [-1, 1], or a latent
    denoiser's latents (:func:`fedsynth.diffusion.latent.to_images` decodes them). ``sampler``
    must have its timesteps set and must not be shared between concurrent calls (schedulers
    are stateful)."""
    conditional = null_label(unet) is not None
    if labels is not None and not conditional:
        raise ValueError("labels given but the model is unconditional")
    if labels is None and conditional:
        raise ValueError("the model is class-conditional: pass labels")
    n = len(labels) if labels is not None else num_images
    if not n:
        raise ValueError("nothing to generate: pass labels or num_images")
    device = next(unet.parameters()).device
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn((n, channels, size, size), generator=generator, device=device)
    x = x * sampler.init_noise_sigma
    labels = labels.to(device) if labels is not None else None
    for t in sampler.timesteps:
        model_in = sampler.scale_model_input(x, t)
        eps = _guided_noise(unet, model_in, t.to(device).expand(n), labels, guidance)
        x = sampler.step(eps, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step()
    return x if isinstance(unet, PromptUNet) else x.clamp(-1.0, 1.0)  # latents are not bounded

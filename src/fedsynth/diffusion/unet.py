"""The denoiser: a diffusers ``UNet2DModel`` built from a named preset.

Class-conditional models use ``num_class_embeds = num_classes + 1``: the extra last
index is the "no label" token used for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel

from fedsynth.config import ModelConfig
from fedsynth.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    },
    "small": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    },
    "base": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 16,
    },
    "large": {  # GPU size (configs/fashion-gpu.toml)
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
    },
}


def null_label(unet: UNet2DModel) -> int | None:
    """The class index meaning "no label" (classifier-free guidance), or None."""
    n = unet.config.num_class_embeds
    return None if n is None else int(n) - 1


def build_unet(cfg: ModelConfig, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset = {cfg.preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    levels = len(preset["block_out_channels"])
    if image_size % (2 ** (levels - 1)):
        raise ConfigError(
            f"data.image_size = {image_size} must be divisible by {2 ** (levels - 1)} "
            f"for model.preset = {cfg.preset!r}"
        )
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=num_classes + 1 if cfg.conditional else None,
        **preset,
    )


def seeded_unet(cfg: ModelConfig, seed: int, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    """``build_unet`` with weights initialised from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_unet(cfg, image_size, channels, num_classes)


def count_parameters(unet: UNet2DModel) -> int:
    return sum(p.numel() for p in unet.parameters())

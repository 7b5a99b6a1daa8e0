"""The denoiser: a diffusers ``UNet2DModel`` built from a named preset.

Class-conditional models use ``num_class_embeds = num_classes + 1``: the extra last
index is the "no label" token used for classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from fedsynth.config import LoraConfig, ModelConfig, is_pipeline_folder
from fedsynth.core.errors import ConfigError
from fedsynth.diffusion.latent import PromptUNet, build_latent
from fedsynth.diffusion.lora import add_lora

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


def null_label(unet: torch.nn.Module) -> int | None:
    """The class index meaning "no label" (classifier-free guidance; a latent denoiser's empty
    prompt), or None for an unconditional model."""
    if isinstance(unet, PromptUNet):
        return unet.null_index
    n = unet.config.num_class_embeds
    return None if n is None else int(n) - 1


NO_LORA = LoraConfig()


def build_unet(
    cfg: ModelConfig,
    image_size: int,
    channels: int,
    num_classes: int,
    lora: LoraConfig = NO_LORA,
    class_names: tuple[str, ...] = (),
) -> UNet2DModel | PromptUNet:
    """The preset's UNet (with ``lora``'s adapters when its rank is > 0), weights from the
    global RNG; or, when ``model.init`` is a pipeline folder, its latent denoiser
    (:func:`seeded_unet`)."""
    if is_pipeline_folder(cfg.init):
        return seeded_unet(cfg, 0, image_size, channels, num_classes, lora, class_names)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset = {cfg.preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    levels = len(preset["block_out_channels"])
    if image_size % (2 ** (levels - 1)):
        raise ConfigError(
            f"data.image_size = {image_size} must be divisible by {2 ** (levels - 1)} "
            f"for model.preset = {cfg.preset!r}"
        )
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=num_classes + 1 if cfg.conditional else None,
        **preset,
    )
    return add_lora(unet, lora, seed=0)


def seeded_unet(
    cfg: ModelConfig,
    seed: int,
    image_size: int,
    channels: int,
    num_classes: int,
    lora: LoraConfig = NO_LORA,
    class_names: tuple[str, ...] = (),
) -> UNet2DModel | PromptUNet:
    """``build_unet`` with weights initialised from ``seed`` (global RNG left untouched), or
    loaded from ``model.init`` (a pipeline folder: its UNet, conditioned on ``class_names``'
    prompts); then ``lora``'s adapters, A drawn from ``seed`` too."""
    if is_pipeline_folder(cfg.init):
        names = tuple(class_names) or tuple(str(i) for i in range(num_classes))
        unet = build_latent(cfg.init, image_size, channels, names, cfg.prompt, cfg.base_dtype)
        return add_lora(unet, lora, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(cfg, image_size, channels, num_classes)
    if cfg.init:
        unet.load_state_dict(init_weights(Path(cfg.init), unet))
    return add_lora(unet, lora, seed)


def init_folder(path: Path) -> Path:
    """The diffusers UNet folder behind ``model.init``: a fedsynth run, its ``model/`` folder,
    or a folder saved by ``UNet2DModel.save_pretrained``."""
    for candidate in (path / "model" / "unet", path / "unet", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"model.init = {str(path)!r}: no trained model there (a fedsynth run or a UNet folder)")


def init_weights(path: Path, unet: UNet2DModel) -> dict[str, torch.Tensor]:
    """The weights of the model at ``path``, checked to fit ``unet`` tensor by tensor (the
    image size may differ: a UNet's weights do not depend on it)."""
    folder = init_folder(path)
    weights = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).state_dict()
    for name, tensor in unet.state_dict().items():
        got = weights.get(name)
        if got is None or got.shape != tensor.shape:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise ConfigError(
                f"model.init = {str(path)!r} does not fit this model: {name} is {found}, needs "
                f"{tuple(tensor.shape)} (same model.preset, model.conditional, channels and classes)"
            )
    return weights


def count_parameters(unet: UNet2DModel) -> int:
    return sum(p.numel() for p in unet.parameters())

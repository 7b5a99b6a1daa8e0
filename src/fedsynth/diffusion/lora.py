"""LoRA adapters on the denoiser (Hu et al. 2022), through peft — the library diffusers' own
fine-tuning scripts use.

A target layer W (Linear or Conv2d) becomes W + (α / r) · B·A, with A (r × in) drawn at
random (Kaiming-uniform) and B (out × r) zero, so an adapted model starts equal to its base.
Code name → symbol: ``lora_A`` → A, ``lora_B`` → B, ``rank`` → r, ``alpha`` → α.

peft renames a wrapped layer's own weights ``….base_layer.weight`` and adds
``….lora_A.default.weight`` / ``….lora_B.default.weight``: the whole adapted model keeps
one state dict, exchanged and checkpointed by those names (never peft's stripped names,
whose silent mismatch drops an aggregated adapter). :func:`merged_unet` folds the adapters
into a plain model (what ``model/unet`` holds); :func:`save_adapter` writes the adapter in
diffusers' LoRA file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from fedsynth.config import LoraConfig, module_list
from fedsynth.core.errors import ConfigError

# Attention projections (diffusers' Attention) and the resnet blocks' 3×3 convolutions.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """``lora.targets`` as peft's ``target_modules``; "" = the defaults the model has. A
    named target that matches no Linear or Conv2d layer is a ConfigError."""
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    named = module_list(lora.targets)
    for target in named:
        if not any(_matches(n, target) for n in layers):
            raise ConfigError(f"lora.targets: {target!r} matches no linear or convolution layer of the model")
    targets = named or [t for t in DEFAULT_TARGETS if any(_matches(n, t) for n in layers)]
    if not targets:
        raise ConfigError("lora.targets: the model has none of the default target layers; name some")
    return targets


def add_lora(model: UNet2DModel, lora: LoraConfig, seed: int) -> UNet2DModel:
    """Wrap ``model``'s target layers with rank-r adapters in place; A is drawn from ``seed``
    (every node draws the same A: FFA-LoRA's shared initialisation), the global RNG untouched.
    Rank 0 (LoRA off) leaves ``model`` as it is."""
    if lora.rank == 0:
        return model
    spec = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        target_modules=resolve_targets(model, lora),
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(spec, model)
    for name, p in model.named_parameters():  # which parameters train is train.trainable's and lora's rule
        p.requires_grad_(True)
        if ".lora_" in name:  # adapters train in float32 on a half-precision base too
            p.data = p.data.float()
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with every adapter folded in (W ← W + α/r · B·A), under
    the plain model's names."""
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
    return {
        k.replace(".base_layer.", "."): v
        for k, v in merged.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k
    }


def merged_unet(model: UNet2DModel) -> UNet2DModel:
    """A plain ``UNet2DModel`` carrying ``model``'s merged weights (itself when it has no adapter)."""
    if not has_lora(model):
        return model
    plain = UNet2DModel.from_config(model.config)
    plain.load_state_dict(merged_weights(model), strict=True)
    return plain.to(next(model.parameters()).device)


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


def save_adapter(folder: Path, model: torch.nn.Module) -> None:
    """The adapters alone in ``folder/pytorch_lora_weights.safetensors``, written by diffusers
    (``unet.…lora_A.weight``: peft's names without the adapter name; rank, α and targets in its
    metadata), so ``pipe.load_lora_weights(folder)`` reads it."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        weight_name=LORA_WEIGHTS,
    )

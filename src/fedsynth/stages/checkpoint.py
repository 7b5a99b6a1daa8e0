"""Checkpoints and the final model, in diffusers layout.

``checkpoints/round-NNNN/``: ``unet/`` (current weights), ``ema/`` (EMA weights as a
loadable UNet), ``scheduler/``, ``state.pt`` (optimizer / strategy state, RNG states,
round) and ``meta.json`` (written last). A partly frozen model (LoRA adapters,
``train.trainable``) keeps only what trains: ``unet/trained.safetensors`` and the EMA's trained
tensors in ``state.pt`` — the frozen rest is the starting model's, rebuilt on resume, so a
Stable Diffusion checkpoint is megabytes, not twice its UNet. ``model/``: ``unet/`` holds the
EMA weights (what sampling uses) and ``scheduler/`` the training noise schedule.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, ModelMixin, UNet2DModel
from safetensors.torch import load_file, save_file

from fedsynth.core.errors import RunDirError, first_line
from fedsynth.core.rundir import RunDir, write_dir_atomic
from fedsynth.diffusion.latent import PromptUNet, is_latent_model, load_latent, save_latent
from fedsynth.diffusion.lora import has_lora, merged_unet, save_adapter
from fedsynth.diffusion.training import ModelEMA

log = logging.getLogger("fedsynth.stages.checkpoint")
SAFETENSORS = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes
TRAINED = "trained.safetensors"  # a partly frozen model's checkpoint: the tensors that change


def ema_unet(unet: ModelMixin, ema: ModelEMA) -> ModelMixin:
    """A copy of ``unet`` carrying the EMA weights."""
    shadow = copy.deepcopy(unet)
    ema.copy_into(shadow)
    return shadow


@dataclass
class Checkpoint:
    round: int
    unet: UNet2DModel
    ema: ModelEMA
    state: dict[str, Any]


def changing_keys(model: torch.nn.Module, trained: list[str] | None) -> frozenset[str] | None:
    """What a checkpoint of ``model`` must hold: ``trained`` (the keys that train; None = all)
    and every buffer (running statistics change without an optimizer)."""
    if trained is None:
        return None
    return frozenset(trained) | {name for name, _ in model.named_buffers()}


def _trained_ema(ema: ModelEMA, keep: frozenset[str]) -> dict[str, Any]:
    """``ema``'s state with its shadow weights named and cut to ``keep``."""
    shadow = {n: w for n, w in ema.named_shadow().items() if n in keep}
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"} | {"shadow_trained": shadow}


def save_checkpoint(
    run: RunDir,
    round_: int,
    unet: ModelMixin,
    ema: ModelEMA,
    scheduler: DDPMScheduler | None,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: frozenset[str] | None = None,
) -> Path:
    """Checkpoint ``round_``; ``keep`` (:func:`changing_keys`): the tensors that change, the
    only ones written (None: the whole model, loadable on its own)."""
    target = run.checkpoint_dir(round_)

    def fill(tmp: Path) -> None:
        if keep is None:
            unet.save_pretrained(tmp / "unet")
            ema_unet(unet, ema).save_pretrained(tmp / "ema")
            ema_state = ema.state_dict()
        else:
            (tmp / "unet").mkdir()
            weights = {k: v.contiguous() for k, v in unet.state_dict().items() if k in keep}
            save_file(weights, tmp / "unet" / TRAINED)
            ema_state = _trained_ema(ema, keep)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
        torch.save({"round": round_, "ema": ema_state, **state}, tmp / "state.pt")
        files = {str(f.relative_to(tmp)): _digest(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / "meta.json").write_text(
            json.dumps({"round": round_, **(meta or {}), "files": files}, indent=2)
        )

    write_dir_atomic(target, fill)
    return target


EmaFactory = Callable[[ModelMixin], ModelEMA]


def _load_trained(path: Path, template: ModelMixin | type[ModelMixin], device: torch.device) -> ModelMixin:
    """The model saved at ``path``: ``template``'s class reads it (diffusers' loader), or, for a
    model whose layout its class does not know (LoRA adapters wrapped in), a copy of
    ``template`` takes the saved state dict, strictly."""
    if isinstance(template, type):
        return template.from_pretrained(path, low_cpu_mem_usage=False).to(device)
    model = copy.deepcopy(template).to(device)
    model.load_state_dict(load_file(path / SAFETENSORS, device=str(device)), strict=True)
    return model


def _load_changed(file: Path, template: ModelMixin | type[ModelMixin], device: torch.device) -> ModelMixin:
    """A copy of the starting model ``template`` with the changed tensors of ``file``."""
    if isinstance(template, type):
        raise RunDirError(f"{file} holds only the trained tensors; the run's starting model is needed")
    model = copy.deepcopy(template).to(device)
    changed = load_file(file, device=str(device))
    unknown = sorted(set(changed) - set(model.state_dict()))
    if unknown:
        raise RunDirError(f"{file}: {unknown[0]} is not a tensor of this run's model")
    model.load_state_dict(changed, strict=False)
    return model


def load_checkpoint(
    path: Path,
    make_ema: EmaFactory,
    device: torch.device,
    model_class: ModelMixin | type[ModelMixin] = UNet2DModel,
) -> Checkpoint:
    """The checkpoint at ``path``; its EMA is the configured one (``make_ema``: its decay
    schedule) carrying the saved shadow weights and step count. ``model_class``: what was
    trained (the denoiser, or task ``classifier``'s CNN), or a model of the trained layout
    (with LoRA adapters) to copy."""
    if not (path / "meta.json").is_file():
        raise RunDirError(f"incomplete checkpoint (no meta.json): {path}")
    if (path / "unet" / TRAINED).is_file():
        unet = _load_changed(path / "unet" / TRAINED, model_class, device)
    else:
        unet = _load_trained(path / "unet", model_class, device)
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    ema = make_ema(unet)
    schedule = {"decay": ema.decay, "min_decay": ema.min_decay}
    saved = state.pop("ema")
    saved["shadow_params"] = _saved_shadow(saved, unet, ema)
    ema.load_state_dict({**saved, **schedule})
    ema.to(device)
    return Checkpoint(round=int(state.pop("round")), unet=unet, ema=ema, state=state)


def _saved_shadow(saved: dict[str, Any], unet: torch.nn.Module, ema: ModelEMA) -> list[torch.Tensor]:
    """The saved averages of ``ema``'s parameters, in its order: a trained-only checkpoint names
    them (``shadow_trained``); a whole one lists every parameter's, or, from an EMA over what
    trains, those. A parameter saved without one (frozen) averages to its own value."""
    if "shadow_trained" in saved:
        named = saved.pop("shadow_trained")
    else:
        listed = saved.pop("shadow_params")
        every = [name for name, _ in unet.named_parameters()]
        named = dict(zip(every if len(listed) == len(every) else ema.names, listed, strict=True))
    params = dict(unet.named_parameters())
    return [named[n] if n in named else params[n].detach().clone() for n in ema.names]


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def verify_checkpoint(path: Path) -> None:
    """Every file ``meta.json`` lists (written last, with sizes and SHA-256) is there and
    unchanged; raises ``RunDirError`` naming the first that is not. Checkpoints written
    before the list existed are checked when loaded."""
    try:
        files = json.loads((path / "meta.json").read_text()).get("files", {})
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}/meta.json is unreadable ({err})") from None
    for name, expected in files.items():
        f = path / name
        if not f.is_file() or _digest(f) != expected:
            raise RunDirError(f"{f} is missing or changed since it was written")


def load_latest_checkpoint(
    run: RunDir,
    make_ema: EmaFactory,
    device: torch.device,
    model_class: ModelMixin | type[ModelMixin] = UNet2DModel,
) -> Checkpoint:
    """The newest intact checkpoint of ``run``: a damaged one (verification or loading fails)
    is skipped with a warning for the one before; a clear error when none is intact."""
    paths = run.checkpoints_newest_first()
    if not paths:
        raise RunDirError(f"nothing to resume: no checkpoint in {run.checkpoints}")
    for path in paths:
        try:
            verify_checkpoint(path)
            return load_checkpoint(path, make_ema, device, model_class)
        except (
            RunDirError,
            OSError,
            RuntimeError,
            ValueError,
            KeyError,
            EOFError,
            pickle.UnpicklingError,
        ) as err:
            log.warning(
                "checkpoint %s is damaged, resuming from the one before: %s", path.name, first_line(err)
            )
    raise RunDirError(f"nothing to resume: every checkpoint in {run.checkpoints} is damaged")


def save_model(
    run: RunDir,
    unet: ModelMixin,
    ema: ModelEMA,
    scheduler: DDPMScheduler | None,
    ema_info: dict | None = None,
    trained: list[str] | None = None,
) -> Path:
    """``model/``: the EMA weights and the noise schedule (none for task ``classifier``);
    ``model/ema.json`` says which EMA. With LoRA adapters, ``model/unet`` holds the merged
    weights (a plain model) and ``model/pytorch_lora_weights.safetensors`` the adapter alone;
    a latent denoiser keeps its base in its own folder (``trained``: the keys that trained)."""

    def fill(tmp: Path) -> None:
        shadow = ema_unet(unet, ema)
        if isinstance(shadow, PromptUNet):
            save_latent(tmp, shadow, trained)
        else:
            merged_unet(shadow).save_pretrained(tmp / "unet")
            if has_lora(shadow):
                save_adapter(tmp, shadow)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
        if ema_info is not None:
            (tmp / "ema.json").write_text(json.dumps(ema_info, indent=2) + "\n")

    write_dir_atomic(run.model, fill)
    return run.model


def save_personal_model(
    run: RunDir, unet: UNet2DModel, weights: dict[str, torch.Tensor], scheduler: DDPMScheduler
) -> Path:
    """A client's own model (``weights`` loaded into a copy of ``unet``) as ``run/model``."""
    personal = copy.deepcopy(unet)
    personal.load_state_dict(weights, strict=True)

    def fill(tmp: Path) -> None:
        merged_unet(personal).save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")

    write_dir_atomic(run.model, fill)
    return run.model


def load_model(run: RunDir, device: torch.device) -> tuple[UNet2DModel | PromptUNet, DDPMScheduler]:
    if is_latent_model(run.model):
        scheduler = DDPMScheduler.from_pretrained(run.model, subfolder="scheduler")
        return load_latent(run.model).to(device).eval(), scheduler
    if not (run.model / "unet").is_dir():
        raise RunDirError(f"no trained model in {run.model} (run `fedsynth run` first)")
    if not (run.model / "scheduler").is_dir():
        raise RunDirError(f"{run.model} holds a classifier (task = 'classifier'), not a generative model")
    unet = UNet2DModel.from_pretrained(run.model, subfolder="unet", low_cpu_mem_usage=False).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(run.model, subfolder="scheduler")
    return unet, scheduler

"""One client's local round, independent of Flower.

Receives the global weights (by state-dict key), trains ``steps_for(...)`` optimizer
steps on the client's data and returns the new weights plus what the server needs.
Randomness is derived from (seed, round, client id), so a client's update does not
depend on which process or machine runs it, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from fedsynth.config import Config, trained_keys
from fedsynth.core.seeding import torch_generator
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import (
    ModelEMA,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    resolve_device,
    steps_for,
)
from fedsynth.privacy.dpsgd import dp_train_steps
from fedsynth.strategies.scaffold import client_control_update, corrected_gradient
from fedsynth.training.tasks import build_model, task_steps

Weights = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    weights: Weights
    num_examples: int
    num_steps: int
    train_loss: float
    compute_s: float
    control_delta: Weights | None = None  # SCAFFOLD's Δc_i


def round_generator(seed: int, round_: int, client_id: int, device: torch.device) -> torch.Generator:
    return torch_generator(seed, "local-train", round_, client_id, device=device)


def proximal_penalty(mu: float, anchor: Weights):
    """FedProx: (μ / 2) ‖w − w_global‖² over the trained parameters."""

    def penalty(unet: UNet2DModel) -> torch.Tensor:
        terms = [((p - anchor[name]) ** 2).sum() for name, p in unet.named_parameters()]
        return 0.5 * mu * torch.stack(terms).sum()

    return penalty


def scaffold_hook(c: Weights, c_i: Weights):
    def hook(unet: UNet2DModel) -> None:
        for name, p in unet.named_parameters():
            if p.grad is not None and name in c:
                p.grad.copy_(corrected_gradient(p.grad, c[name], c_i[name]))

    return hook


def build_client_model(cfg: Config, data: ImageData, device: torch.device) -> torch.nn.Module:
    return build_model(cfg, data.shape[1], data.shape[0], data.num_classes, data.class_names).to(device)


def _load_start(unet: torch.nn.Module, cfg: Config, weights: Weights) -> None:
    """``weights`` into the freshly built ``unet``: every tensor, or at least every one that
    trains (a ledger's round model holds only those; the frozen rest is this starting model's)."""
    state = unet.state_dict()
    absent = set(state) - set(weights)
    trained = set(trained_keys(cfg.trained_modules, state))
    if absent & trained:
        raise ValueError(f"the round's model lacks {sorted(absent & trained)[0]}, which trains")
    device = next(iter(state.values())).device
    result = unet.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the round's model holds {result.unexpected_keys[0]}, which this model has not")


def local_train(
    cfg: Config,
    data: ImageData,
    global_weights: Weights,
    *,
    round_: int,
    client_id: int,
    state: dict[str, Weights],
    control: Weights | None = None,
    steps: int | None = None,
    ema_decay: float = 0.0,
) -> ClientUpdate:
    """Train on ``data`` from ``global_weights``. ``state`` persists across this client's
    rounds (SCAFFOLD's c_i lives there); ``control`` is the server's c for SCAFFOLD, for
    the parameters this client uploads (only those are corrected and get a new c_i).
    ``steps`` overrides the configured local steps (FedDDPM's one-off local model); with
    ``ema_decay`` > 0 the returned weights are their EMA over the steps (constant decay, the
    first step copied) instead of the last iterate."""
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    unet = build_client_model(cfg, data, device)
    _load_start(unet, cfg, global_weights)
    anchor = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    steps = steps or steps_for(cfg.train, len(data))
    penalty = (
        proximal_penalty(cfg.strategy.fedprox.proximal_mu, anchor) if cfg.strategy.name == "fedprox" else None
    )
    hook = None
    if control is not None:
        c = {k: v.to(device) for k, v in control.items()}
        known = state.get("scaffold_c_i", {})
        c_i = {k: known[k].to(device) if k in known else torch.zeros_like(v) for k, v in c.items()}
        hook = scaffold_hook(c, c_i)
    optimizer = make_optimizer(unet, cfg.train, cfg.trained_modules)
    if cfg.train.keep_optimizer and "optimizer" in state:
        load_optimizer_tensors(optimizer, unet, state["optimizer"])
    generator = round_generator(cfg.seed, round_, client_id, device)
    scheduler = build_train_scheduler(cfg.diffusion) if cfg.task == "diffusion" else None
    ema = ModelEMA(unet, cfg.trained_modules, decay=ema_decay, min_decay=ema_decay) if ema_decay > 0 else None
    if cfg.privacy.mode == "dp-sgd":
        losses = dp_train_steps(
            unet, optimizer, scheduler, data, steps=steps, train=cfg.train, diffusion=cfg.diffusion,
            privacy=cfg.privacy, generator=generator, ema=ema,
        )  # fmt: skip
    else:
        losses = task_steps(
            cfg, unet, optimizer, scheduler, data, steps=steps, generator=generator,
            penalty=penalty, after_backward=hook, ema=ema,
        )  # fmt: skip
    if ema is not None:
        ema.copy_into(unet)
    weights = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    if cfg.train.keep_optimizer:
        state["optimizer"] = optimizer_tensors(optimizer, unet)
    delta = None
    if control is not None:
        old_c_i = _np(c_i)
        new_c_i = client_control_update(
            old_c_i, _np(c), _np(anchor), _np(weights), steps=steps, lr=cfg.train.lr
        )
        delta = {k: torch.from_numpy(new_c_i[k] - old_c_i[k]) for k in new_c_i}
        state["scaffold_c_i"] = {**known, **{k: torch.from_numpy(v) for k, v in new_c_i.items()}}
    return ClientUpdate(
        weights=weights,
        num_examples=len(data),
        num_steps=steps,
        train_loss=float(sum(losses) / len(losses)),
        compute_s=time.perf_counter() - start,
        control_delta=delta,
    )


def _np(weights: Weights) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in weights.items()}

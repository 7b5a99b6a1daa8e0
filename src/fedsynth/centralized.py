"""Stage 2 (centralized paradigm): train one model on the union of the clients' data.

Compute is counted as in Senden 2025: one centralized "round" does the optimizer
steps that ``clients_per_round`` clients would do in one federated round, so runs of
the three paradigms with the same config do the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from fedsynth.checkpoint import load_latest_checkpoint, save_checkpoint, save_model
from fedsynth.config import Config
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import (
    make_ema,
    make_optimizer,
    resolve_device,
    steps_for,
    train_steps,
)
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.prepare import Prepared
from fedsynth.progress import progress_bar
from fedsynth.rundir import RunDir


def steps_per_round(cfg: Config, prepared: Prepared) -> int:
    mean_client = float(np.mean([len(c) for c in prepared.clients]))
    return cfg.federation.clients_per_round * steps_for(cfg.train, round(mean_client))


@dataclass
class CentralState:
    unet: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    round: int = 0


def _fresh_state(cfg: Config, data: ImageData, device: torch.device) -> CentralState:
    unet = seeded_unet(cfg.model, cfg.seed, data.shape[1], data.shape[0], data.num_classes).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return CentralState(
        unet, make_ema(unet, cfg.diffusion.ema_decay), make_optimizer(unet.parameters(), cfg.train), generator
    )


def _resumed_state(cfg: Config, run: RunDir, device: torch.device) -> CentralState:
    ckpt = load_latest_checkpoint(run, cfg.diffusion.ema_decay, device)
    optimizer = make_optimizer(ckpt.unet.parameters(), cfg.train)
    optimizer.load_state_dict(ckpt.state["optimizer"])
    generator = torch.Generator(device=device)
    generator.set_state(ckpt.state["generator"].cpu())
    run.truncate_metrics(ckpt.round)
    return CentralState(ckpt.unet, ckpt.ema, optimizer, generator, ckpt.round)


def train_centralized(
    cfg: Config, run: RunDir, prepared: Prepared, *, resume: bool = False
) -> tuple[UNet2DModel, EMAModel, DDPMScheduler]:
    device = resolve_device(cfg.train.device)
    data = prepared.data.full.subset(np.concatenate([*prepared.clients, prepared.shared]))
    scheduler = build_train_scheduler(cfg.diffusion)
    state = _resumed_state(cfg, run, device) if resume else _fresh_state(cfg, data, device)
    steps = steps_per_round(cfg, prepared)
    rounds = cfg.federation.rounds
    with progress_bar("centralized training", total=rounds * steps) as bar:
        bar.advance(state.round * steps)
        for r in range(state.round + 1, rounds + 1):
            start = time.perf_counter()
            losses = train_steps(
                state.unet,
                state.optimizer,
                scheduler,
                data,
                steps=steps,
                train=cfg.train,
                diffusion=cfg.diffusion,
                generator=state.generator,
                ema=state.ema,
                on_step=lambda loss: bar.advance(1, loss),
            )
            wall = time.perf_counter() - start
            run.append_metrics(
                {
                    "round": r,
                    "train_loss": float(np.mean(losses)),
                    "wall_s": wall,
                    "client_compute_s": wall,
                    "steps": steps,
                    "bytes_up": 0,
                    "bytes_down": 0,
                    "clients": ["central"],
                    "dropped": [],
                }
            )
            if r % cfg.federation.checkpoint_every == 0 or r == rounds:
                save_checkpoint(
                    run,
                    r,
                    state.unet,
                    state.ema,
                    scheduler,
                    {
                        "optimizer": state.optimizer.state_dict(),
                        "generator": state.generator.get_state(),
                    },
                )
    save_model(run, state.unet, state.ema, scheduler)
    return state.unet, state.ema, scheduler

"""Stage 2 (centralized paradigm): train one model on the union of the clients' data.

Compute is counted as in Senden 2025: one centralized "round" does the optimizer
steps that ``clients_per_round`` clients would do in one federated round, so runs of
the three paradigms with the same config do the same work. The EMA of the weights is
stepped after every optimizer step (``diffusion.ema_decay``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from fedsynth.checkpoint import Checkpoint
from fedsynth.config import Config
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, make_optimizer, resolve_device, steps_for, train_steps
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.prepare import Prepared
from fedsynth.rounds import Model, RoundRecord, Tick, run_rounds
from fedsynth.rundir import RunDir


def steps_per_round(cfg: Config, prepared: Prepared) -> int:
    mean_client = float(np.mean([len(c) for c in prepared.clients]))
    return cfg.federation.clients_per_round * steps_for(cfg.train, round(mean_client))


class CentralDriver:
    """One model, one optimizer, one generator for the batches and noise."""

    label = "centralized training"

    def __init__(self, cfg: Config, data: ImageData, steps: int) -> None:
        device = resolve_device(cfg.train.device)
        self.cfg, self.data, self.units_per_round = cfg, data, steps
        self.ema_info = {
            "stepped": "per optimizer step",
            "decay": cfg.diffusion.ema_decay,
            "warm_up": "min(decay, (1 + n) / (10 + n))",
        }
        unet = seeded_unet(cfg.model, cfg.seed, data.shape[1], data.shape[0], data.num_classes).to(device)
        self.model = Model(unet, self.make_ema(unet), build_train_scheduler(cfg.diffusion))
        self.optimizer = make_optimizer(unet.parameters(), cfg.train)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.round = 0

    def make_ema(self, unet: UNet2DModel) -> EMAModel:
        return make_ema(unet, self.cfg.diffusion.ema_decay)

    def resume(self, checkpoint: Checkpoint) -> None:
        self.model.unet, self.model.ema, self.round = checkpoint.unet, checkpoint.ema, checkpoint.round
        self.optimizer = make_optimizer(checkpoint.unet.parameters(), self.cfg.train)
        self.optimizer.load_state_dict(checkpoint.state["optimizer"])
        self.generator = torch.Generator(device=self.model.device)
        self.generator.set_state(checkpoint.state["generator"].cpu())

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run_round(self, tick: Tick) -> RoundRecord:
        start = time.perf_counter()
        losses = train_steps(
            self.model.unet,
            self.optimizer,
            self.model.scheduler,
            self.data,
            steps=self.units_per_round,
            train=self.cfg.train,
            diffusion=self.cfg.diffusion,
            generator=self.generator,
            ema=self.model.ema,
            on_step=lambda loss: tick(1, loss),
        )
        self.round += 1
        wall = time.perf_counter() - start
        extra = {"client_compute_s": wall, "steps": self.units_per_round}
        return RoundRecord(self.round, float(np.mean(losses)), wall, 0, 0, ["central"], extra=extra)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def finish(self) -> None:
        pass


def train_centralized(cfg: Config, run: RunDir, prepared: Prepared, *, resume: bool = False) -> None:
    data = prepared.data.full.subset(np.concatenate([*prepared.clients, prepared.shared]))
    driver = CentralDriver(cfg, data, steps_per_round(cfg, prepared))
    run_rounds(driver, run, cfg, resume=resume)

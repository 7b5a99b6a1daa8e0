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

from fedsynth.config import Config
from fedsynth.core.rundir import RunDir
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import (
    ModelEMA,
    make_ema,
    make_optimizer,
    resolve_device,
    steps_for,
    train_steps,
)
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.privacy.accounting import privacy_ledger
from fedsynth.privacy.dpsgd import dp_train_steps
from fedsynth.stages.checkpoint import Checkpoint
from fedsynth.stages.prepare import Prepared
from fedsynth.training.round_loop import Model, RoundRecord, Tick, run_rounds


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
        unet = seeded_unet(
            cfg.model, cfg.seed, data.shape[1], data.shape[0], data.num_classes, cfg.lora, data.class_names
        ).to(device)
        self.model = Model(unet, self.make_ema(unet), build_train_scheduler(cfg.diffusion))
        self.optimizer = make_optimizer(unet, cfg.train, cfg.trained_modules)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.privacy = privacy_ledger(cfg)
        self.round = 0

    def make_ema(self, unet: UNet2DModel) -> ModelEMA:
        return make_ema(unet, self.cfg.diffusion.ema_decay, self.cfg.trained_modules)

    def resume(self, checkpoint: Checkpoint) -> None:
        self.model.net, self.model.ema, self.round = checkpoint.unet, checkpoint.ema, checkpoint.round
        self.optimizer = make_optimizer(checkpoint.unet, self.cfg.train, self.cfg.trained_modules)
        self.optimizer.load_state_dict(checkpoint.state["optimizer"])
        self.generator = torch.Generator(device=self.model.device)
        self.generator.set_state(checkpoint.state["generator"].cpu())
        if self.privacy is not None:
            self.privacy.load_state_dict(checkpoint.state["privacy"])

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def run_round(self, tick: Tick) -> RoundRecord:
        start, cfg, m = time.perf_counter(), self.cfg, self.model
        common = dict(
            steps=self.units_per_round, train=cfg.train, diffusion=cfg.diffusion, generator=self.generator
        )
        if self.privacy is not None:
            self.privacy.check_next("central", self.units_per_round, self.round + 1)
            losses = dp_train_steps(
                m.net, self.optimizer, m.scheduler, self.data, privacy=cfg.privacy, ema=m.ema,
                on_step=lambda loss: tick(1, loss), **common,
            )  # fmt: skip
        else:
            losses = train_steps(
                m.net, self.optimizer, m.scheduler, self.data, ema=m.ema, on_step=lambda loss: tick(1, loss),
                **common,
            )  # fmt: skip
        self.round += 1
        wall = time.perf_counter() - start
        extra = {"client_compute_s": wall, "steps": self.units_per_round}
        if self.privacy is not None:
            self.privacy.record("central", self.units_per_round, len(self.data))
            extra.update(self.privacy.report())
        return RoundRecord(self.round, float(np.mean(losses)), wall, 0, 0, ["central"], extra=extra)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def finish(self) -> None:
        pass


def train_centralized(cfg: Config, run: RunDir, prepared: Prepared, *, resume: bool = False) -> None:
    data = prepared.data.full.subset(np.concatenate([*prepared.clients, prepared.shared]))
    driver = CentralDriver(cfg, data, steps_per_round(cfg, prepared))
    run_rounds(driver, run, cfg, resume=resume)

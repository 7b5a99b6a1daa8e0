"""The round skeleton every paradigm runs, written once.

A paradigm is a :class:`RoundDriver`: it holds the model being trained and its own
state, and runs one round at a time. :func:`run_rounds` owns everything around the
rounds — shaped like Flower's ``Strategy.start`` and improved-diffusion's ``TrainLoop``:

1. resume: the newest complete checkpoint is handed to ``driver.resume`` and the metrics
   after it are dropped;
2. ``driver.session()``: the participants are readied (nothing centrally; nodes
   discovered over Flower; contract deployed and nodes registered on a ledger);
3. rounds: ``driver.run_round`` → one ``metrics.jsonl`` line (:class:`RoundRecord`) →
   a checkpoint every ``federation.checkpoint_every`` rounds and after the last one;
4. ``driver.finish()`` inside the session (e.g. personal models collected), then the
   final model is saved in diffusers layout.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedsynth.config import Config, trained_keys
from fedsynth.core.errors import FedsynthError
from fedsynth.core.progress import progress_bar
from fedsynth.core.rundir import RunDir
from fedsynth.core.seeding import numpy_rng
from fedsynth.diffusion.lora import has_lora
from fedsynth.diffusion.training import ModelEMA, make_ema
from fedsynth.stages.checkpoint import (
    Checkpoint,
    changing_keys,
    load_latest_checkpoint,
    save_checkpoint,
    save_model,
)
from fedsynth.stages.tracking import checkpoint_grid, record_round


class RoundError(FedsynthError):
    """A round cannot be run (e.g. every client excluded)."""


Tick = Callable[[int, float | None], None]  # (progress units done, latest loss)


@dataclass(frozen=True)
class Dropped:
    """A client whose update was not used in a round, and why."""

    client: int | str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "reason": self.reason}


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``: the documented keys, then ``extra`` (keys that a
    paradigm or a round hook adds, also documented in docs/run-directory.md)."""

    round: int
    train_loss: float
    wall_s: float
    bytes_up: int
    bytes_down: int
    clients: list[int] | list[str]
    dropped: list[Dropped] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        core = {
            "round": self.round,
            "train_loss": self.train_loss,
            "wall_s": self.wall_s,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "clients": list(self.clients),
            "dropped": [d.to_json() for d in self.dropped],
        }
        clash = set(core) & set(self.extra)
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would overwrite the documented keys")
        return {**core, **self.extra}


@dataclass
class Model:
    """What is trained and saved: the network (``net``: the denoiser — a pixel UNet, or a latent
    one behind :mod:`fedsynth.diffusion.latent` — or task ``classifier``'s CNN), its EMA and the
    training noise schedule (None for the classifier)."""

    net: UNet2DModel
    ema: ModelEMA
    scheduler: DDPMScheduler | None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)


class RoundDriver(Protocol):
    label: str  # progress bar description
    units_per_round: int  # progress units per round (optimizer steps centrally, else 1)
    round: int  # rounds completed
    model: Model
    ema_info: dict[str, Any]  # which EMA the saved model holds (model/ema.json)

    def make_ema(self, unet: UNet2DModel) -> ModelEMA: ...

    def resume(self, checkpoint: Checkpoint) -> None: ...

    def session(self) -> AbstractContextManager[None]: ...

    def run_round(self, tick: Tick) -> RoundRecord: ...

    def state_dict(self) -> dict[str, Any]: ...

    def checkpoint_meta(self) -> dict[str, Any]: ...

    def finish(self) -> None: ...


class ServerEma:
    """The federated and decentralized drivers' EMA: of the global model, once per round."""

    cfg: Config

    def make_ema(self, unet: UNet2DModel) -> ModelEMA:
        return make_ema(unet, self.cfg.federation.server_ema_decay, self.cfg.trained_modules)

    @property
    def ema_info(self) -> dict[str, Any]:
        decay = self.cfg.federation.server_ema_decay
        return {"stepped": "per round", "decay": decay, "warm_up": "min(decay, (1 + n) / (10 + n))"}


def select_clients(
    seed: int, round_: int, attempt: int, num_clients: int, k: int, exclude: frozenset[int] = frozenset()
) -> list[int]:
    """k clients (fewer if fewer remain), seeded by (seed, round, attempt), never an excluded one."""
    rng = numpy_rng(seed, "select", round_, attempt)
    if not exclude:
        return sorted(rng.choice(num_clients, size=k, replace=False).tolist())
    pool = [c for c in range(num_clients) if c not in exclude]
    if not pool:
        raise RoundError("every client has been excluded by threshold filtering")
    return sorted(int(c) for c in rng.choice(pool, size=min(k, len(pool)), replace=False))


def run_rounds(driver: RoundDriver, run: RunDir, cfg: Config, *, resume: bool) -> None:
    """Run ``driver`` to ``federation.rounds`` (from the newest checkpoint when resuming)."""
    m = driver.model
    trained = trained_keys(cfg.trained_modules, m.net.state_dict()) if cfg.trained_modules else None
    keep = changing_keys(m.net, trained)  # the rest stays the starting model's: not checkpointed
    if resume:
        template = m.net if has_lora(m.net) or keep is not None else type(m.net)
        checkpoint = load_latest_checkpoint(run, driver.make_ema, m.device, template)
        driver.resume(checkpoint)
        run.truncate_metrics(checkpoint.round)
    total, every = cfg.federation.rounds, cfg.federation.checkpoint_every
    with driver.session(), progress_bar(driver.label, total=total * driver.units_per_round) as bar:
        bar.advance(driver.round * driver.units_per_round)
        while driver.round < total:
            record = driver.run_round(lambda n, loss: bar.advance(n, loss))
            record_round(run, record.to_json())
            if driver.round % every == 0 or driver.round == total:
                m = driver.model
                save_checkpoint(
                    run,
                    driver.round,
                    m.net,
                    m.ema,
                    m.scheduler,
                    driver.state_dict(),
                    driver.checkpoint_meta(),
                    keep,
                )
                checkpoint_grid(cfg, run, m.net, m.scheduler, driver.round)
        driver.finish()
    m = driver.model
    save_model(run, m.net, m.ema, m.scheduler, driver.ema_info, trained)

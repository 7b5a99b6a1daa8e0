"""Round hooks: server-side steps after aggregation, composed by the round runner only
when configured. Each has a ``name`` (its key in checkpoint state), ``after_aggregate(round,
updates) -> dict`` (keys merged into the round's metrics line) and its own
``state_dict`` / ``load_state_dict``.

- :class:`Calibration` — FedDDPM / FedDDPM+: fine-tune the aggregated model on the
  auxiliary set (always, or when the auxiliary loss stalls); :func:`build_auxiliary`
  makes that set once, from the clients' one-off local models.
- :class:`ThresholdFilter` — Phoenix threshold filtering: warnings, two strikes, exclusions.
- :class:`HeldoutAccuracy` — task ``classifier``: the global model's test accuracy every round.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.core.protocol import ARRAYS, CONFIG, METRICS, ROUND_KEY, STEPS_KEY, TASK_KEY, UpdateInfo
from fedsynth.core.records import record_numpy
from fedsynth.core.rundir import RunDir
from fedsynth.core.validate import Expected, check_arrays
from fedsynth.data.datasets import ImageData
from fedsynth.exchange.transfer import Layout
from fedsynth.server.calibration import (
    aux_loss,
    auxiliary_counts,
    generate_auxiliary,
    load_auxiliary,
    save_auxiliary,
    server_train,
    stalled,
)
from fedsynth.server.filtering import exclusions, strikes_after, warned
from fedsynth.server.messages import FederationError, Nodes, broadcast
from fedsynth.strategies.adapter import Update
from fedsynth.training.round_loop import Model
from fedsynth.training.tasks import heldout_accuracy

log = logging.getLogger("fedsynth.server")


class RoundHook(Protocol):
    name: str

    def after_aggregate(self, round_: int, updates: list[Update]) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def hook_state(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A hook's saved state; checkpoints written before hooks kept it at the top level."""
    if name in state.get("hooks", {}):
        return state["hooks"][name]
    if name == "calibration" and "calibration" in state:
        return state["calibration"]
    if name == "filtering" and "strikes" in state:
        return {
            "strikes": state["strikes"],
            **({"excluded": state["excluded"]} if "excluded" in state else {}),
        }
    return None


# ------------------------------------------------------------------ FedDDPM / FedDDPM+


class Calibration:
    """FedDDPM (``calibration.mode = "always"``) / FedDDPM+ (``"stall"``)."""

    name = "calibration"

    def __init__(self, cfg: Config, model: Model) -> None:
        self.cfg, self.model = cfg, model
        self.aux: ImageData | None = None  # set by build_auxiliary before round 1
        self.history: list[float] = []  # auxiliary loss after each aggregation
        self.last_fire = 0

    def after_aggregate(self, round_: int, updates: list[Update]) -> dict[str, Any]:
        if self.aux is None:
            raise RuntimeError("Calibration.aux must be built (build_auxiliary) before the first round")
        c, unet, scheduler = self.cfg.calibration, self.model.net, self.model.scheduler
        loss = aux_loss(unet, scheduler, self.aux, seed=self.cfg.seed)
        self.history.append(loss)
        fire = c.mode == "always" or stalled(self.history, c.window, c.min_improvement, self.last_fire)
        info: dict[str, Any] = {"aux_loss": loss, "calibrated": fire, "server_s": 0.0}
        if fire:
            mean, seconds = server_train(self.cfg, unet, scheduler, self.aux, c.server_steps, tag=round_)
            self.last_fire = len(self.history) - 1
            info.update(calibration_loss=mean, server_s=seconds)
            if c.mode == "stall":
                log.warning("round %d: progress stalled (aux loss %.4f): server correction ran", round_, loss)
        return info

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_fire": self.last_fire}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(x) for x in state.get("history", [])]
        self.last_fire = int(state.get("last_fire", 0))


def build_auxiliary(
    cfg: Config,
    run: RunDir,
    model: Model,
    layout: Layout,
    class_names: tuple[str, ...],
    grid: Grid,
    nodes: Nodes,
    histograms: dict[int, list[int]],
    base: ConfigRecord,
) -> ImageData:
    """The auxiliary set: loaded from the run directory, or built from one-off local models."""
    path = run.root / "auxiliary.pt"
    if path.is_file():
        return load_auxiliary(path, class_names)
    start, c = time.perf_counter(), cfg.calibration
    timeout = cfg.federation.round_timeout
    models, _, bytes_down, bytes_up = local_models(
        cfg, model, layout, grid, nodes, base, c.pretrain_steps, timeout
    )
    order = sorted(models)
    counts = auxiliary_counts(np.array([histograms[p] for p in order]), c.aux_size)
    by_client = dict(zip(order, counts, strict=True))
    aux = generate_auxiliary(
        model.net, model.scheduler, models, by_client, class_names, steps=c.sampler_steps, seed=cfg.seed
    )
    save_auxiliary(path, aux, counts)
    run.update_summary(
        pretrain_bytes_up=bytes_up,
        pretrain_bytes_down=bytes_down,
        pretrain_clients=order,
        aux_images=len(aux),
        aux_build_s=time.perf_counter() - start,
    )
    return aux


def local_models(
    cfg: Config,
    model: Model,
    layout: Layout,
    grid: Grid,
    nodes: Nodes,
    base: ConfigRecord,
    steps: int,
    timeout: float,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, UpdateInfo], int, int]:
    """A one-off round: every client trains a local model for ``steps`` steps from the current
    weights and uploads it within ``timeout`` seconds. (models, reports, bytes down, bytes up)."""
    config = ConfigRecord({**base, ROUND_KEY: 0, TASK_KEY: "pretrain", STEPS_KEY: steps})
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    sent = layout.sent  # what no one trains never travels: each client has it
    records = {ARRAYS: ArrayRecord({k: state[k] for k in sent}), CONFIG: config}
    replies, errors, down, up = broadcast(grid, nodes, records, MessageType.TRAIN, timeout)
    for pid, reason in sorted(errors.items()):
        log.warning("no local model from client %s: %s", pid, reason)
    models, infos = {}, {}
    for pid, reply in sorted(replies.items()):
        arrays = record_numpy(reply.content[ARRAYS]) if ARRAYS in reply.content else {}
        try:
            info = UpdateInfo.from_mapping(dict(reply.content[METRICS]))
            reason = check_arrays(arrays, Expected({k: layout.shapes[k] for k in sent}))
        except (KeyError, TypeError, ValueError) as err:
            reason = f"malformed report: {err}"
        if reason:
            log.warning("local model of client %s rejected: %s", pid, reason)
            continue
        received = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        models[pid] = {**{k: state[k] for k in layout.frozen}, **received}
        infos[pid] = info
    if not models:
        raise FederationError("no client returned a local model")
    return models, infos, down, up


# ------------------------------------------------------------------ task classifier


class HeldoutAccuracy:
    """Task ``classifier``: the aggregated global model's top-1 accuracy on the held-out
    test split after every round (``test_accuracy``; FedDiff's Table 1 measure)."""

    name = "test-accuracy"

    def __init__(self, model: Model, test: ImageData) -> None:
        self.model, self.test = model, test

    def after_aggregate(self, round_: int, updates: list[Update]) -> dict[str, Any]:
        return {"test_accuracy": heldout_accuracy(self.model.net, self.test)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------ Phoenix filtering


class ThresholdFilter:
    """Phoenix threshold filtering from ``phoenix.filter_from``: clients report their
    self-measured precision; warned twice in a row → excluded from selection."""

    name = "filtering"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.strikes: dict[int, int] = {}
        self.excluded: set[int] = set()

    def after_aggregate(self, round_: int, updates: list[Update]) -> dict[str, Any]:
        ph = self.cfg.phoenix
        if round_ < ph.filter_from:
            return {}
        precision = {
            u.info.client: u.info.filter_precision for u in updates if u.info.filter_precision is not None
        }
        warned_now = warned(precision, ph.filter_mode, ph.precision_threshold)
        before, num_clients = self.excluded, self.cfg.partition.num_clients
        self.strikes = strikes_after(self.strikes, set(precision), warned_now)
        floor = self.cfg.federation.clients_per_round
        self.excluded, spared = exclusions(before, self.strikes, precision, num_clients, floor)
        newly = sorted(self.excluded - before)
        _log_filtering(round_, precision, warned_now, newly, spared)
        return {
            "filter_precision": precision,
            "filter_warned": sorted(warned_now),
            "filter_excluded_now": newly,
            "filter_spared": spared,
            "filter_excluded": sorted(self.excluded),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"strikes": dict(self.strikes), "excluded": sorted(self.excluded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strikes = {int(k): int(v) for k, v in state.get("strikes", {}).items()}
        twice = [pid for pid, n in self.strikes.items() if n >= 2]  # checkpoints without the list
        self.excluded = {int(pid) for pid in state.get("excluded", twice)}


def _log_filtering(
    round_: int, precision: dict[int, float], warned_now: set[int], newly: list[int], spared: list[int]
) -> None:
    for pid in sorted(warned_now):
        log.warning("round %d: client %s warned (precision %.3f)", round_, pid, precision[pid])
    for pid in newly:
        log.warning("round %d: client %s excluded after two consecutive warnings", round_, pid)
    if spared:
        log.warning(
            "round %d: clients %s warned twice but spared: excluding them would leave fewer than "
            "federation.clients_per_round eligible clients",
            round_,
            spared,
        )

"""The federated round runner over a Flower ``Grid`` (a :class:`~fedsynth.training.round_loop.RoundDriver`).

Per round: seeded client selection → one TRAIN message per selected node (its download,
the run config, the strategy's extras) → replies screened (``server/messages.py``) →
each aggregation unit aggregated by its own strategy over the clients that sent it
(``strategies/adapter.py``; FedDiff's weight space pre-trained at the start of the
session: ``server/weight_pool.py``) → round hooks (``server/hooks.py``: FedDDPM calibration,
Phoenix filtering, the privacy ledger, task ``classifier``'s test accuracy; only those
configured) → server EMA. With fewer than
``federation.min_clients`` valid updates the round is retried with a fresh selection
(``federation.max_retries`` times), then the run stops with a clear error; the last
checkpoint stays intact. The loop around rounds is :func:`fedsynth.training.round_loop.run_rounds`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MessageType
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.core.protocol import ARRAYS, CONFIG, NUM_EXAMPLES
from fedsynth.core.rundir import RunDir
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.training import trainable_parameters
from fedsynth.exchange.plans import UNITS, upload_groups
from fedsynth.exchange.transfer import Layout, ServerExchange, has_personal_models
from fedsynth.privacy.accounting import privacy_ledger
from fedsynth.server.aggregation import aggregation_steps
from fedsynth.server.hooks import (
    Calibration,
    HeldoutAccuracy,
    RoundHook,
    ThresholdFilter,
    build_auxiliary,
    hook_state,
)
from fedsynth.server.messages import (
    FederationError,
    Nodes,
    Screened,
    base_config,
    broadcast,
    decode_reply,
    discover_nodes,
    payload_bytes,
    screen,
    train_message,
)
from fedsynth.server.weight_pool import attach_weight_space
from fedsynth.stages.checkpoint import Checkpoint, ema_unet, save_personal_model
from fedsynth.strategies import WEIGHT_KEYS, build_strategy
from fedsynth.strategies.adapter import Update, aggregate
from fedsynth.strategies.scaffold import warn_if_adaptive
from fedsynth.training.round_loop import Model, RoundRecord, ServerEma, Tick, select_clients

log = logging.getLogger("fedsynth.server")
Weights = dict[str, torch.Tensor]


class FederatedDriver(ServerEma):
    """Holds the global model, one strategy per aggregation unit and the round hooks."""

    units_per_round = 1

    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        model: Model,
        class_names: tuple[str, ...],
        grid: Grid,
        test: ImageData | None = None,
        proxy: ImageData | None = None,
    ) -> None:
        self.cfg, self.run, self.model, self.grid, self.proxy = cfg, run, model, grid, proxy
        self.label = f"federated {cfg.strategy.name}"
        self.layout = Layout.of(model.net.state_dict(), cfg.exchange.personal, cfg.trained_modules)
        trainable_parameters(model.net, cfg.trained_modules)  # a bad pattern fails before any client trains
        self.exchange = ServerExchange(cfg.exchange, self.layout)
        # one strategy per aggregation unit (groups always uploaded together)
        self.units = {"+".join(u): self.layout.keys(u) for u in UNITS[cfg.exchange.plan]}
        self.strategies = {name: build_strategy(cfg) for name in self.units}
        self.weight_key = WEIGHT_KEYS[cfg.federation.weighting]
        self.base = base_config(cfg, class_names, self.layout.base_digest)
        self.class_names = class_names
        self.calibration = Calibration(cfg, model) if cfg.calibration.mode != "off" else None
        self.filter = ThresholdFilter(cfg) if cfg.phoenix.filter_from else None
        self.privacy = privacy_ledger(cfg)
        tested = HeldoutAccuracy(model, test) if cfg.task == "classifier" and test is not None else None
        hooks = (self.calibration, self.filter, self.privacy, tested)
        self.hooks: list[RoundHook] = [h for h in hooks if h is not None]
        self.steps = aggregation_steps(cfg, lambda: self.histograms)
        if cfg.strategy.name == "scaffold":
            warn_if_adaptive(cfg.train.optimizer)
        self.nodes: Nodes = {}
        self.histograms: dict[int, list[int]] = {}  # class counts the nodes report
        self.round = 0

    # ------------------------------------------------------------------ state
    def resume(self, checkpoint: Checkpoint) -> None:
        self.model.net, self.model.ema, self.round = checkpoint.unet, checkpoint.ema, checkpoint.round
        for name, strategy in self.strategies.items():
            strategy.load_state_dict(checkpoint.state["strategies"][name])
        for hook in self.hooks:
            if (state := hook_state(checkpoint.state, hook.name)) is not None:
                hook.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategies": {name: s.state_dict() for name, s in self.strategies.items()},
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Learn which node holds which partition; build FedDDPM's auxiliary set if needed."""
        fed = self.cfg.federation
        timeout = max(60.0, fed.round_timeout)
        self.nodes, self.histograms = discover_nodes(
            self.grid, self.cfg.partition.num_clients, self.base, timeout
        )
        if self.calibration is not None:
            self.calibration.aux = build_auxiliary(
                self.cfg,
                self.run,
                self.model,
                self.layout,
                self.class_names,
                self.grid,
                self.nodes,
                self.histograms,
                self.base,
            )
        if self.cfg.strategy.name == "feddiff":  # every unit's strategy is FedDiff
            assert self.proxy is not None, "config validation guarantees a proxy set for feddiff"
            for strategy in self.strategies.values():
                attach_weight_space(self.cfg, self.run, self.model, self.proxy, strategy)
        yield

    # ------------------------------------------------------------------ a round
    def global_weights(self) -> Weights:
        return {k: v.detach().cpu() for k, v in self.model.net.state_dict().items()}

    def run_round(self, tick: Tick) -> RoundRecord:
        fed, round_, start = self.cfg.federation, self.round + 1, time.perf_counter()
        attempts: list[tuple[list[int], Screened]] = []
        for attempt in range(fed.max_retries + 1):
            attempts.append(self.attempt(round_, attempt))
            if len(attempts[-1][1].valid) >= fed.min_clients:
                break
        else:
            raise FederationError(
                f"round {round_}: fewer than federation.min_clients = {fed.min_clients} valid replies "
                f"after {fed.max_retries + 1} attempt(s); last checkpoint kept in {self.run.checkpoints}"
            )
        valid = attempts[-1][1].valid
        self.model.load_weights(self.aggregate_units(round_, valid))
        extra: dict[str, Any] = {}
        for strategy in self.strategies.values():
            extra.update(strategy.round_metrics())
        for hook in self.hooks:
            extra.update(hook.after_aggregate(round_, valid))
        self.model.ema.step_with(self.model.net)
        self.round = round_
        record = round_record(round_, attempts, self.weight_key, time.perf_counter() - start)
        record.extra.update(extra)
        tick(1, record.train_loss)
        return record

    def attempt(self, round_: int, attempt: int) -> tuple[list[int], Screened]:
        """Select, send, receive and screen once."""
        cfg, fed = self.cfg, self.cfg.federation
        exclude = frozenset(self.filter.excluded) if self.filter else frozenset()
        selected = select_clients(
            cfg.seed, round_, attempt, cfg.partition.num_clients, fed.clients_per_round, exclude
        )
        if self.privacy is not None:
            self.privacy.check_round(round_, selected, cfg.train.local_steps)
        uploads = upload_groups(cfg.exchange.plan, selected, cfg.seed, round_, attempt)
        global_w = self.global_weights()
        extras = self.begin_round(global_w)
        messages, params_down = [], 0
        for pid, groups in uploads.items():
            arrays, mode, n = self.exchange.download(pid, global_w)
            params_down += n
            messages.append(train_message(self.nodes[pid], self.base, arrays, round_, mode, groups, extras))
        replies = list(self.grid.send_and_receive(messages, timeout=fed.round_timeout))

        def decode(pid: int, reply) -> Update | str:
            keys = self.layout.keys(uploads[pid])
            return decode_reply(reply, keys, self.layout, self.exchange, global_w, self.weight_key)

        screened = screen(replies, self.nodes, set(uploads), fed.round_timeout, decode)
        screened.bytes_down = {p: payload_bytes(m.content) for p, m in zip(uploads, messages, strict=True)}
        screened.params_down = params_down
        for d in screened.dropped:
            self.exchange.forget(int(d.client))
            log.warning("round %d: dropped client %s: %s", round_, d.client, d.reason)
        return selected, screened

    def begin_round(self, global_w: Weights) -> dict[str, ArrayRecord]:
        """Per-unit strategy set-up; their broadcast records merged (e.g. SCAFFOLD's c)."""
        merged: dict[str, dict] = {}
        for name, keys in self.units.items():
            self.strategies[name].begin_round(ArrayRecord({k: global_w[k] for k in keys}))
            for record_name, record in self.strategies[name].broadcast().items():
                merged.setdefault(record_name, {}).update(record.items())
        return {name: ArrayRecord(arrays) for name, arrays in merged.items()}

    def aggregate_units(self, round_: int, valid: list[Update]) -> Weights:
        """Each unit aggregated by its strategy over the clients that sent it (a unit nobody
        sent keeps its global value), between the aggregation steps' ``before`` and ``after``."""
        global_w = self.global_weights()
        replies = valid
        for step in self.steps:
            replies = step.before(round_, replies, global_w)
        new = dict(global_w)
        for name, keys in self.units.items():
            sent = [u for u in replies if keys[0] in u.weights]
            if sent:
                new.update(aggregate(self.strategies[name], round_, sent, keys))
        for step in self.steps:
            new = step.after(new, global_w, valid)
        return new

    # ------------------------------------------------------------------ after the last round
    def finish(self) -> None:
        if has_personal_models(self.cfg.exchange):
            self.export_personal()

    def export_personal(self) -> dict:
        """Collect each client's personal groups and save its own model under ``clients/``.

        Evaluation-only traffic (in a real federation each client would evaluate its own
        model); counted separately as ``export_bytes``, not in the training bytes."""
        timeout = self.cfg.federation.round_timeout
        replies, missing, _, nbytes = broadcast(
            self.grid, self.nodes, {CONFIG: self.base}, MessageType.EVALUATE, timeout
        )
        shared = {
            k: v.detach().cpu() for k, v in ema_unet(self.model.net, self.model.ema).state_dict().items()
        }
        for pid, reply in sorted(replies.items()):
            local = reply.content[ARRAYS].to_torch_state_dict()
            client = self.run.client(pid).create()
            client.write_config(self.cfg)
            save_personal_model(client, self.model.net, {**shared, **local}, self.model.scheduler)
        for pid, reason in sorted(missing.items()):
            log.warning("client %s has no personal model: %s", pid, reason)
        info = {"clients_exported": sorted(replies), "export_missing": missing, "export_bytes": nbytes}
        self.run.update_summary(**info)
        return info


def round_record(
    round_: int, attempts: list[tuple[list[int], Screened]], weight_key: str, wall: float
) -> RoundRecord:
    """The metrics line of a round; bytes and parameters count every attempt."""
    selected, last = attempts[-1]
    infos = [u.info for u in last.valid]
    weights = np.array([i.num_examples if weight_key == NUM_EXAMPLES else i.num_steps for i in infos], float)
    losses = np.array([i.train_loss for i in infos])
    dropped = [d for _, s in attempts for d in s.dropped]
    extra = {
        "train_loss_per_client": {i.client: i.train_loss for i in infos},
        "client_compute_s": {i.client: i.compute_s for i in infos},
        "examples_per_client": {i.client: i.num_examples for i in infos},
        "bytes_up_per_client": last.bytes_up,
        "bytes_down_per_client": last.bytes_down,
        "params_up": sum(s.params_up for _, s in attempts),
        "params_down": sum(s.params_down for _, s in attempts),
        "selected": selected,
        "attempts": len(attempts),
    }
    return RoundRecord(
        round=round_,
        train_loss=float((weights * losses).sum() / weights.sum()),
        wall_s=wall,
        bytes_up=sum(sum(s.bytes_up.values()) for _, s in attempts),
        bytes_down=sum(sum(s.bytes_down.values()) for _, s in attempts),
        clients=sorted(i.client for i in infos),
        dropped=dropped,
        extra=extra,
    )

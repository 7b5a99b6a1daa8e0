"""The federated round loop, driven through a Flower ``Grid``.

Per round: seeded client selection → one TRAIN message per selected node (global
weights + config [+ strategy extras]) → replies screened (errors, timeouts, bad
weights) → the strategy aggregates the valid ones → server EMA → metrics line →
checkpoint. With fewer than ``federation.min_clients`` valid replies the round is
retried with a fresh selection (``federation.max_retries`` times), then the run stops
with a clear error; the last checkpoint stays intact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import tomli_w
import torch
from diffusers import DDPMScheduler, UNet2DModel
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsynth.checkpoint import (
    ema_unet,
    load_latest_checkpoint,
    save_checkpoint,
    save_model,
    save_personal_model,
)
from fedsynth.client.app import CLASSES_KEY, CONFIG_KEY
from fedsynth.config import Config, config_to_dict, dump_config
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema
from fedsynth.errors import FedsynthError
from fedsynth.exchange.codecs import CodecError
from fedsynth.exchange.plans import UNITS, upload_groups
from fedsynth.exchange.transfer import Layout, ServerExchange, has_personal_models
from fedsynth.progress import progress_bar
from fedsynth.records import numpy_record, record_numpy
from fedsynth.rundir import RunDir
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
from fedsynth.server.validate import Expected, check_arrays, check_metrics
from fedsynth.strategies import WEIGHT_KEYS, build_strategy
from fedsynth.strategies.scaffold import CONTROL_KEY

log = logging.getLogger("fedsynth.server")


class FederationError(FedsynthError):
    """The federation cannot continue (too few valid clients, no nodes)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: serialized arrays plus config/metric values."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


def select_clients(
    seed: int, round_: int, attempt: int, num_clients: int, k: int, exclude: frozenset[int] = frozenset()
) -> list[int]:
    """k clients (fewer if fewer remain), seeded by (seed, round, attempt), never an excluded one."""
    rng = np.random.default_rng([seed, round_, attempt])
    if not exclude:
        return sorted(rng.choice(num_clients, size=k, replace=False).tolist())
    pool = [c for c in range(num_clients) if c not in exclude]
    if not pool:
        raise FederationError("every client has been excluded by threshold filtering")
    return sorted(int(c) for c in rng.choice(pool, size=min(k, len(pool)), replace=False))


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


def discover_nodes(
    grid: Grid, cfg: Config, base: ConfigRecord, timeout: float
) -> tuple[dict[int, int], dict[int, list[int]]]:
    """(partition id → node id, partition id → class histogram), asking every node who it is."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < cfg.partition.num_clients:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of partition.num_clients = {cfg.partition.num_clients} nodes "
                f"connected within {timeout:.0f} s"
            )
        time.sleep(0.5)
    queries = [
        Message(content=RecordDict({"config": base}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    mapping: dict[int, int] = {}
    histograms: dict[int, list[int]] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            log.warning("node %s failed to identify itself: %s", reply.metadata.src_node_id, reply.error)
            continue
        pid = int(reply.content["info"]["partition-id"])
        if pid in mapping:
            raise FederationError(f"two nodes claim partition-id {pid}; give each a distinct one")
        mapping[pid] = reply.metadata.src_node_id
        histograms[pid] = [int(x) for x in reply.content["info"]["histogram"]]
    missing = sorted(set(range(cfg.partition.num_clients)) - set(mapping))
    if missing:
        raise FederationError(f"no node answered for partition-id(s) {missing}")
    return mapping, histograms


@dataclass
class Valid:
    """A screened reply: who sent it and its decoded weights (upload groups only)."""

    reply: Message
    pid: int
    weights: dict[str, torch.Tensor]


@dataclass
class RoundOutcome:
    valid: list[Valid]
    dropped: list[dict] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    params_up: int = 0
    params_down: int = 0


class RoundRunner:
    """Holds the global model, server EMA and strategy; runs rounds over a Grid."""

    def __init__(self, cfg: Config, run: RunDir, unet: UNet2DModel, class_names: list[str]) -> None:
        self.cfg, self.run = cfg, run
        self.unet = unet
        self.ema = make_ema(unet, cfg.diffusion.ema_decay)
        self.scheduler: DDPMScheduler = build_train_scheduler(cfg.diffusion)
        self.layout = Layout.of(unet.state_dict(), cfg.exchange.personal)
        self.exchange = ServerExchange(cfg.exchange, self.layout)
        # one strategy per aggregation unit (groups always uploaded together): per-key
        # aggregation over the clients that sent those keys, with the unit's own state
        self.units = {"+".join(u): self.layout.keys(u) for u in UNITS[cfg.exchange.plan]}
        self.strategies = {name: build_strategy(cfg) for name in self.units}
        self.weight_key = WEIGHT_KEYS[cfg.federation.weighting]
        self.round = 0
        self.class_names = tuple(class_names)
        self.aux: ImageData | None = None  # FedDDPM's auxiliary set
        self.aux_history: list[float] = []
        self.last_fire = 0
        self.strikes: dict[int, int] = {}  # Phoenix threshold filtering
        self.excluded: set[int] = set()
        self.base_config = ConfigRecord(
            {
                CONFIG_KEY: tomli_w.dumps(config_to_dict(cfg)),
                CLASSES_KEY: list(class_names),
            }
        )

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        device = next(self.unet.parameters()).device
        ckpt = load_latest_checkpoint(self.run, self.cfg.diffusion.ema_decay, device)
        self.unet, self.ema, self.round = ckpt.unet, ckpt.ema, ckpt.round
        for name, strategy in self.strategies.items():
            strategy.load_state_dict(ckpt.state["strategies"][name])
        calibration = ckpt.state.get("calibration", {})
        self.aux_history = [float(x) for x in calibration.get("history", [])]
        self.last_fire = int(calibration.get("last_fire", 0))
        self.strikes = {int(k): int(v) for k, v in ckpt.state.get("strikes", {}).items()}
        twice = [pid for pid, n in self.strikes.items() if n >= 2]  # checkpoints without the list
        self.excluded = {int(pid) for pid in ckpt.state.get("excluded", twice)}
        self.run.truncate_metrics(self.round)

    def checkpoint(self) -> None:
        save_checkpoint(
            self.run,
            self.round,
            self.unet,
            self.ema,
            self.scheduler,
            {
                "strategies": {name: s.state_dict() for name, s in self.strategies.items()},
                "calibration": {"history": list(self.aux_history), "last_fire": self.last_fire},
                "strikes": dict(self.strikes),
                "excluded": sorted(self.excluded),
            },
        )

    # ------------------------------------------------------------------ rounds
    def _global(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.unet.state_dict().items()}

    def _extras(self, global_w: dict[str, torch.Tensor]) -> dict[str, ArrayRecord]:
        """Per-unit strategy set-up; their broadcast records merged (e.g. SCAFFOLD's c)."""
        merged: dict[str, dict] = {}
        for name, keys in self.units.items():
            self.strategies[name].begin_round(ArrayRecord({k: global_w[k] for k in keys}))
            for record_name, record in self.strategies[name].broadcast().items():
                merged.setdefault(record_name, {}).update(record.items())
        return {name: ArrayRecord(arrays) for name, arrays in merged.items()}

    def _messages(self, round_: int, nodes: dict[int, int], uploads: dict[int, tuple[str, ...]]):
        global_w = self._global()
        extras = self._extras(global_w)
        messages, params = [], 0
        for pid, groups in uploads.items():
            arrays, mode, n = self.exchange.download(pid, global_w)
            params += n
            config = ConfigRecord(
                {
                    **self.base_config,
                    "server-round": round_,
                    "exchange-mode": mode,
                    "upload-groups": list(groups),
                }
            )
            content = RecordDict({"arrays": numpy_record(arrays), "config": config, **extras})
            messages.append(Message(content=content, dst_node_id=nodes[pid], message_type=MessageType.TRAIN))
        return messages, params

    def _decode(self, reply: Message, groups: tuple[str, ...]) -> tuple[dict | None, str | None]:
        if "arrays" not in reply.content or "metrics" not in reply.content:
            return None, "reply without arrays or metrics"
        keys = self.layout.keys(groups)
        arrays = record_numpy(reply.content["arrays"])
        expected = Expected({k: self.layout.shapes[k] for k in keys})
        if self.exchange.codec.lossless and (reason := check_arrays(arrays, expected)):
            return None, reason
        try:
            weights = self.exchange.upload(arrays, keys, self._global())
        except CodecError as err:
            return None, f"undecodable update: {err}"
        reason = check_arrays({k: v.numpy() for k, v in weights.items()}, expected) or check_metrics(
            dict(reply.content["metrics"]), self.weight_key
        )
        return (None, reason) if reason else (weights, None)

    def _screen(self, replies: list[Message], uploads: dict[int, tuple[str, ...]], nodes: dict[int, int]):
        pid_of = {n: p for p, n in nodes.items()}
        out = RoundOutcome(valid=[])
        answered = set()
        for reply in replies:
            pid = pid_of.get(reply.metadata.src_node_id, -1)
            answered.add(pid)
            if reply.has_error():
                out.dropped.append({"client": pid, "reason": f"client error: {reply.error.reason}"})
                continue
            out.bytes_up[pid] = payload_bytes(reply.content)
            weights, reason = self._decode(reply, uploads[pid])
            if reason:
                out.dropped.append({"client": pid, "reason": reason})
            else:
                out.valid.append(Valid(reply, pid, weights))
                out.params_up += sum(int(v.numel()) for v in weights.values())
        timeout = self.cfg.federation.round_timeout
        for pid in uploads:
            if pid not in answered:
                reason = f"no reply within federation.round_timeout = {timeout} s"
                out.dropped.append({"client": pid, "reason": reason})
        for d in out.dropped:
            self.exchange.forget(d["client"])
            log.warning("round %d: dropped client %s: %s", self.round + 1, d["client"], d["reason"])
        return out

    def _attempt(self, grid: Grid, nodes: dict[int, int], round_: int, attempt: int):
        fed, cfg = self.cfg.federation, self.cfg
        out = frozenset(self.excluded)
        selected = select_clients(
            cfg.seed, round_, attempt, cfg.partition.num_clients, fed.clients_per_round, out
        )
        uploads = upload_groups(cfg.exchange.plan, selected, cfg.seed, round_, attempt)
        messages, params_down = self._messages(round_, nodes, uploads)
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        outcome = self._screen(replies, uploads, nodes)
        outcome.bytes_down = {p: payload_bytes(m.content) for p, m in zip(uploads, messages, strict=True)}
        outcome.params_down = params_down
        return selected, outcome

    def _aggregate(self, round_: int, valid: list[Valid]) -> None:
        """Each unit aggregated by its strategy over the clients that sent it."""
        new = self._global()
        for name, keys in self.units.items():
            subs = [_sub_reply(v, keys) for v in valid if keys[0] in v.weights]
            if not subs:
                continue  # nobody sent this unit this round: it stays as it was
            aggregated, _ = self.strategies[name].aggregate_train(round_, subs)
            if aggregated is None:
                raise FederationError(f"round {round_}: the strategy produced no aggregate for {name}")
            new.update(aggregated.to_torch_state_dict())
        device = next(self.unet.parameters()).device
        self.unet.load_state_dict({k: v.to(device) for k, v in new.items()}, strict=True)

    def run_round(self, grid: Grid, nodes: dict[int, int]) -> dict:
        fed = self.cfg.federation
        round_ = self.round + 1
        start = time.perf_counter()
        attempts, outcomes, dropped = [], [], []
        for attempt in range(fed.max_retries + 1):
            selected, outcome = self._attempt(grid, nodes, round_, attempt)
            attempts.append(selected)
            outcomes.append(outcome)
            dropped += outcome.dropped
            if len(outcome.valid) >= fed.min_clients:
                break
        else:
            raise FederationError(
                f"round {round_}: fewer than federation.min_clients = {fed.min_clients} valid replies "
                f"after {fed.max_retries + 1} attempt(s); last checkpoint kept in {self.run.checkpoints}"
            )
        self._aggregate(round_, outcome.valid)
        calibration = self._calibrate(round_)
        filtering = self._filter(round_, outcome.valid)
        self.ema.step(self.unet.parameters())
        self.round = round_
        record = self._record(round_, outcomes, attempts, dropped, time.perf_counter() - start)
        return {**record, **calibration, **filtering}

    def _filter(self, round_: int, valid: list[Valid]) -> dict:
        """Phoenix threshold filtering: warnings and two-strike exclusions (metrics.jsonl)."""
        ph = self.cfg.phoenix
        if not ph.filter_from or round_ < ph.filter_from:
            return {}
        precision = {
            v.pid: float(v.reply.content["metrics"]["filter-precision"])
            for v in valid
            if "filter-precision" in v.reply.content["metrics"]
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

    # ------------------------------------------------------------- FedDDPM
    def prepare_calibration(
        self, grid: Grid, nodes: dict[int, int], histograms: dict[int, list[int]]
    ) -> None:
        """The auxiliary set: loaded from the run directory, or built from one-off local models."""
        path = self.run.root / "auxiliary.pt"
        if path.is_file():
            self.aux = load_auxiliary(path, self.class_names)
            return
        start, c = time.perf_counter(), self.cfg.calibration
        models, bytes_up, bytes_down = self._local_models(grid, nodes)
        order = sorted(models)
        counts = auxiliary_counts(np.array([histograms[p] for p in order]), c.aux_size)
        by_client = dict(zip(order, counts, strict=True))
        self.aux = generate_auxiliary(
            self.unet,
            self.scheduler,
            models,
            by_client,
            self.class_names,
            steps=c.sampler_steps,
            seed=self.cfg.seed,
        )
        save_auxiliary(path, self.aux, counts)
        self.run.update_summary(
            pretrain_bytes_up=bytes_up,
            pretrain_bytes_down=bytes_down,
            pretrain_clients=order,
            aux_images=len(self.aux),
            aux_build_s=time.perf_counter() - start,
        )

    def _local_models(self, grid: Grid, nodes: dict[int, int]) -> tuple[dict[int, dict], int, int]:
        """FedDDPM's one-off round: every client trains a local model and uploads it."""
        config = ConfigRecord({**self.base_config, "server-round": 0, "task": "pretrain"})
        arrays = ArrayRecord(self._global())
        messages = [
            Message(
                content=RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes.values()
        ]
        models, bytes_up = {}, 0
        pid_of = {n: p for p, n in nodes.items()}
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout):
            pid = pid_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                log.warning("FedDDPM: no local model from client %s: %s", pid, reply.error.reason)
                continue
            arrays = record_numpy(reply.content["arrays"])
            if reason := check_arrays(arrays, Expected(self.layout.shapes)):
                log.warning("FedDDPM: local model of client %s rejected: %s", pid, reason)
                continue
            bytes_up += payload_bytes(reply.content)
            models[pid] = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        if not models:
            raise FederationError("FedDDPM: no client returned a local model")
        return models, bytes_up, sum(payload_bytes(m.content) for m in messages)

    def _calibrate(self, round_: int) -> dict:
        if self.aux is None:
            return {}
        c = self.cfg.calibration
        loss = aux_loss(self.unet, self.scheduler, self.aux, seed=self.cfg.seed)
        self.aux_history.append(loss)
        fire = c.mode == "always" or stalled(self.aux_history, c.window, c.min_improvement, self.last_fire)
        info: dict = {"aux_loss": loss, "calibrated": fire, "server_s": 0.0}
        if fire:
            mean, seconds = server_train(
                self.cfg, self.unet, self.scheduler, self.aux, c.server_steps, tag=round_
            )
            self.last_fire = len(self.aux_history) - 1
            info.update(calibration_loss=mean, server_s=seconds)
            if c.mode == "stall":
                log.warning("round %d: progress stalled (aux loss %.4f): server correction ran", round_, loss)
        return info

    def _record(self, round_, outcomes: list[RoundOutcome], attempts, dropped, wall) -> dict:
        valid = outcomes[-1].valid
        metrics = [dict(v.reply.content["metrics"]) for v in valid]
        up = [sum(o.bytes_up.values()) for o in outcomes]
        down = [sum(o.bytes_down.values()) for o in outcomes]
        weights = np.array([m[self.weight_key] for m in metrics], dtype=float)
        losses = np.array([m["train-loss"] for m in metrics])
        return {
            "round": round_,
            "train_loss": float((weights * losses).sum() / weights.sum()),
            "train_loss_per_client": {int(m["partition-id"]): float(m["train-loss"]) for m in metrics},
            "wall_s": wall,
            "client_compute_s": {int(m["partition-id"]): float(m["compute-s"]) for m in metrics},
            "examples_per_client": {int(m["partition-id"]): int(m["num-examples"]) for m in metrics},
            "bytes_up": sum(up),
            "bytes_down": sum(down),
            "bytes_up_per_client": outcomes[-1].bytes_up,
            "bytes_down_per_client": outcomes[-1].bytes_down,
            "params_up": sum(o.params_up for o in outcomes),
            "params_down": sum(o.params_down for o in outcomes),
            "clients": sorted(int(m["partition-id"]) for m in metrics),
            "selected": attempts[-1],
            "attempts": len(attempts),
            "dropped": dropped,
        }

    def export_personal(self, grid: Grid, nodes: dict[int, int]) -> dict:
        """Collect each client's personal groups and save its own model under ``clients/``.

        Evaluation-only traffic (in a real federation each client would evaluate its own
        model); counted separately as ``export_bytes``, not in the training bytes."""
        messages = [
            Message(
                content=RecordDict({"config": self.base_config}),
                dst_node_id=n,
                message_type=MessageType.EVALUATE,
            )
            for n in nodes.values()
        ]
        pid_of = {n: p for p, n in nodes.items()}
        shared = {k: v.detach().cpu() for k, v in ema_unet(self.unet, self.ema).state_dict().items()}
        exported, missing, nbytes = [], {}, 0
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout):
            pid = pid_of.get(reply.metadata.src_node_id, -1)
            if reply.has_error():
                missing[pid] = reply.error.reason
                continue
            nbytes += payload_bytes(reply.content)
            local = reply.content["arrays"].to_torch_state_dict()
            client = self.run.client(pid).create()
            dump_config(self.cfg, client.config)
            save_personal_model(client, self.unet, {**shared, **local}, self.scheduler)
            exported.append(pid)
        for pid, reason in sorted(missing.items()):
            log.warning("client %s has no personal model: %s", pid, reason)
        info = {"clients_exported": sorted(exported), "export_missing": missing, "export_bytes": nbytes}
        self.run.update_summary(**info)
        return info


def _sub_reply(valid: Valid, keys: list[str]) -> Message:
    """The reply restricted to ``keys``, in the form Flower's strategies aggregate."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: valid.weights[k].contiguous() for k in keys}),
            "metrics": valid.reply.content["metrics"],
        }
    )
    if CONTROL_KEY in valid.reply.content:
        control = valid.reply.content[CONTROL_KEY]
        content[CONTROL_KEY] = ArrayRecord({k: control[k] for k in keys})
    return Message(
        content=content, dst_node_id=valid.reply.metadata.src_node_id, message_type=MessageType.TRAIN
    )


def serve(
    grid: Grid, cfg: Config, run: RunDir, unet: UNet2DModel, class_names: list[str], *, resume: bool
) -> None:
    """Run all rounds (from the last checkpoint when resuming) and save the model."""
    runner = RoundRunner(cfg, run, unet, class_names)
    if resume:
        runner.resume()
    nodes, histograms = discover_nodes(
        grid, cfg, runner.base_config, timeout=max(60.0, cfg.federation.round_timeout)
    )
    if cfg.calibration.mode != "off":
        runner.prepare_calibration(grid, nodes, histograms)
    rounds = cfg.federation.rounds
    with progress_bar(f"federated {cfg.strategy.name}", total=rounds) as bar:
        bar.advance(runner.round)
        while runner.round < rounds:
            record = runner.run_round(grid, nodes)
            run.append_metrics(record)
            if runner.round % cfg.federation.checkpoint_every == 0 or runner.round == rounds:
                runner.checkpoint()
            bar.advance(1, record["train_loss"])
    save_model(run, runner.unet, runner.ema, runner.scheduler)
    if has_personal_models(cfg.exchange):
        runner.export_personal(grid, nodes)

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
from diffusers import DDPMScheduler, UNet2DModel
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsynth.checkpoint import load_checkpoint, save_checkpoint, save_model
from fedsynth.client.app import CLASSES_KEY, CONFIG_KEY
from fedsynth.config import Config, config_to_dict
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema
from fedsynth.errors import FedsynthError, RunDirError
from fedsynth.progress import progress_bar
from fedsynth.rundir import RunDir
from fedsynth.server.validate import Expected, check_arrays, check_metrics
from fedsynth.strategies import WEIGHT_KEYS, build_strategy

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


def select_clients(seed: int, round_: int, attempt: int, num_clients: int, k: int) -> list[int]:
    rng = np.random.default_rng([seed, round_, attempt])
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def discover_nodes(grid: Grid, cfg: Config, base: ConfigRecord, timeout: float) -> dict[int, int]:
    """partition id → node id, asking every connected node who it is."""
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
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            log.warning("node %s failed to identify itself: %s", reply.metadata.src_node_id, reply.error)
            continue
        pid = int(reply.content["info"]["partition-id"])
        if pid in mapping:
            raise FederationError(f"two nodes claim partition-id {pid}; give each a distinct one")
        mapping[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(cfg.partition.num_clients)) - set(mapping))
    if missing:
        raise FederationError(f"no node answered for partition-id(s) {missing}")
    return mapping


@dataclass
class RoundOutcome:
    valid: list[Message]
    dropped: list[dict] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0


class RoundRunner:
    """Holds the global model, server EMA and strategy; runs rounds over a Grid."""

    def __init__(self, cfg: Config, run: RunDir, unet: UNet2DModel, class_names: list[str]) -> None:
        self.cfg, self.run = cfg, run
        self.unet = unet
        self.ema = make_ema(unet, cfg.diffusion.ema_decay)
        self.scheduler: DDPMScheduler = build_train_scheduler(cfg.diffusion)
        self.strategy = build_strategy(cfg)
        self.weight_key = WEIGHT_KEYS[cfg.federation.weighting]
        self.round = 0
        self.expected = Expected({k: tuple(v.shape) for k, v in unet.state_dict().items()})
        self.base_config = ConfigRecord(
            {
                CONFIG_KEY: tomli_w.dumps(config_to_dict(cfg)),
                CLASSES_KEY: list(class_names),
            }
        )

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        path = self.run.latest_checkpoint()
        if path is None:
            raise RunDirError(f"nothing to resume: no checkpoint in {self.run.checkpoints}")
        device = next(self.unet.parameters()).device
        ckpt = load_checkpoint(path, self.cfg.diffusion.ema_decay, device)
        self.unet, self.ema, self.round = ckpt.unet, ckpt.ema, ckpt.round
        self.strategy.load_state_dict(ckpt.state["strategy"])
        self.run.truncate_metrics(self.round)

    def checkpoint(self) -> None:
        save_checkpoint(
            self.run,
            self.round,
            self.unet,
            self.ema,
            self.scheduler,
            {"strategy": self.strategy.state_dict()},
        )

    # ------------------------------------------------------------------ rounds
    def _messages(self, round_: int, nodes: dict[int, int], selected: list[int]) -> list[Message]:
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in self.unet.state_dict().items()})
        self.strategy.begin_round(arrays)
        config = ConfigRecord({**self.base_config, "server-round": round_})
        extras = self.strategy.broadcast()
        return [
            Message(
                content=RecordDict({"arrays": arrays, "config": config, **extras}),
                dst_node_id=nodes[p],
                message_type=MessageType.TRAIN,
            )
            for p in selected
        ]

    def _screen(self, replies: list[Message], selected: list[int], nodes: dict[int, int]) -> RoundOutcome:
        pid_of = {n: p for p, n in nodes.items()}
        out = RoundOutcome(valid=[])
        answered = set()
        for reply in replies:
            pid = pid_of.get(reply.metadata.src_node_id, -1)
            answered.add(pid)
            if reply.has_error():
                out.dropped.append({"client": pid, "reason": f"client error: {reply.error.reason}"})
                continue
            out.bytes_up += payload_bytes(reply.content)
            if "arrays" not in reply.content or "metrics" not in reply.content:
                reason = "reply without arrays or metrics"
            else:
                arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
                reason = check_arrays(arrays, self.expected) or check_metrics(
                    dict(reply.content["metrics"]), self.weight_key
                )
            if reason:
                out.dropped.append({"client": pid, "reason": reason})
            else:
                out.valid.append(reply)
        timeout = self.cfg.federation.round_timeout
        for pid in selected:
            if pid not in answered:
                reason = f"no reply within federation.round_timeout = {timeout} s"
                out.dropped.append({"client": pid, "reason": reason})
        for d in out.dropped:
            log.warning("round %d: dropped client %s: %s", self.round + 1, d["client"], d["reason"])
        return out

    def _attempt(self, grid: Grid, nodes: dict[int, int], round_: int, attempt: int):
        fed = self.cfg.federation
        selected = select_clients(
            self.cfg.seed, round_, attempt, self.cfg.partition.num_clients, fed.clients_per_round
        )
        messages = self._messages(round_, nodes, selected)
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        outcome = self._screen(replies, selected, nodes)
        outcome.bytes_down = sum(payload_bytes(m.content) for m in messages)
        return selected, outcome

    def run_round(self, grid: Grid, nodes: dict[int, int]) -> dict:
        fed = self.cfg.federation
        round_ = self.round + 1
        start = time.perf_counter()
        attempts, bytes_up, bytes_down, dropped = [], 0, 0, []
        for attempt in range(fed.max_retries + 1):
            selected, outcome = self._attempt(grid, nodes, round_, attempt)
            attempts.append(selected)
            bytes_up, bytes_down = bytes_up + outcome.bytes_up, bytes_down + outcome.bytes_down
            dropped += outcome.dropped
            if len(outcome.valid) >= fed.min_clients:
                break
        else:
            raise FederationError(
                f"round {round_}: fewer than federation.min_clients = {fed.min_clients} valid replies "
                f"after {fed.max_retries + 1} attempt(s); last checkpoint kept in {self.run.checkpoints}"
            )
        aggregated, _ = self.strategy.aggregate_train(round_, outcome.valid)
        if aggregated is None:
            raise FederationError(f"round {round_}: the strategy produced no aggregate")
        self.unet.load_state_dict(aggregated.to_torch_state_dict(), strict=True)
        self.ema.step(self.unet.parameters())
        self.round = round_
        return self._record(
            round_, outcome.valid, attempts, dropped, bytes_up, bytes_down, time.perf_counter() - start
        )

    def _record(self, round_, valid, attempts, dropped, bytes_up, bytes_down, wall) -> dict:
        metrics = [dict(r.content["metrics"]) for r in valid]
        weights = np.array([m[self.weight_key] for m in metrics], dtype=float)
        losses = np.array([m["train-loss"] for m in metrics])
        return {
            "round": round_,
            "train_loss": float((weights * losses).sum() / weights.sum()),
            "train_loss_per_client": {int(m["partition-id"]): float(m["train-loss"]) for m in metrics},
            "wall_s": wall,
            "client_compute_s": {int(m["partition-id"]): float(m["compute-s"]) for m in metrics},
            "examples_per_client": {int(m["partition-id"]): int(m["num-examples"]) for m in metrics},
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "clients": sorted(int(m["partition-id"]) for m in metrics),
            "selected": attempts[-1],
            "attempts": len(attempts),
            "dropped": dropped,
        }


def serve(
    grid: Grid, cfg: Config, run: RunDir, unet: UNet2DModel, class_names: list[str], *, resume: bool
) -> None:
    """Run all rounds (from the last checkpoint when resuming) and save the model."""
    runner = RoundRunner(cfg, run, unet, class_names)
    if resume:
        runner.resume()
    nodes = discover_nodes(grid, cfg, runner.base_config, timeout=max(60.0, cfg.federation.round_timeout))
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

"""Trainer and aggregator nodes driven by the round contract's events, and the feed that
delivers those events.

A node holds its own key and acts only through the contract and the content store:
- a **trainer**, on ``RoundStarted`` naming it, fetches the model by CID, trains (its
  ``work`` callable: a local process pool in simulation), stores its update and submits
  the CID once; a node that restarts re-registers idempotently and catches up from the
  contract's state (``catch_up``).
- an **aggregator** records every ``UpdateSubmitted``; on ``UpdatesClosed`` it fetches the
  round's updates (each verified against its CID; a bad one is skipped with its reason),
  aggregates them deterministically (through ``strategies/adapter.py``, in client-id
  order, with the configured strategy),
  stores the result and submits its CID. Honest aggregators produce byte-identical blobs
  and therefore the same CID; the contract ends the round on a majority.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from eth_account.signers.local import LocalAccount
from flwr.app import ArrayRecord

from fedsynth.config import Config
from fedsynth.core.errors import FedsynthError
from fedsynth.core.protocol import UpdateInfo
from fedsynth.core.validate import Expected, check_arrays
from fedsynth.exchange.groups import frozen_keys
from fedsynth.ledger.chain import LedgerError, RoundsContract
from fedsynth.ledger.store import ContentStore, Weights
from fedsynth.strategies import WEIGHT_KEYS, build_strategy
from fedsynth.strategies.adapter import Update, aggregate

log = logging.getLogger("fedsynth.ledger")

Listener = Callable[[dict], None]


class EventFeed:
    """Delivers the contract's events, in chain order, to every listener on one thread.

    After a local transaction the feed is woken at once; events of other
    machines' transactions arrive when the node's next block is seen (``idle_wait``
    seconds at most, for JSON-RPC backends)."""

    def __init__(self, rounds: RoundsContract, *, from_block: int = 0, idle_wait: float = 0.5) -> None:
        self.rounds, self.next_block, self.idle_wait = rounds, from_block, idle_wait
        self.listeners: list[Listener] = []
        self.errors: list[BaseException] = []
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedsynth-event-feed", daemon=True)
        rounds.chain.listeners.append(lambda _event: self._wake.set())

    def start(self) -> EventFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_wait)
            self._wake.clear()
            try:
                self._deliver()
            except BaseException as exc:  # kept for the owner, which raises it in the main thread
                log.exception("event feed failed")
                self.errors.append(exc)
                return

    def _deliver(self) -> None:
        with self.rounds.chain.lock:
            latest = self.rounds.chain.w3.eth.block_number
            if latest < self.next_block:
                return
            events = self.rounds.events_since(self.next_block)
            self.next_block = latest + 1
        for event in events:
            for listener in list(self.listeners):
                try:
                    listener(event)
                except FedsynthError as err:
                    log.warning("node failed to react to %s: %s", event["event"], err)


def _stale(rounds: RoundsContract, event: dict) -> bool:
    """An event of a finished round (a node replaying history after a restart)."""
    return int(event["round"]) < int(rounds.view("round"))


def join(rounds: RoundsContract, account: LocalAccount, role: str) -> None:
    """Self-register as ``trainer`` or ``aggregator``; a node that is already registered
    (e.g. restarting after a crash) just carries on."""
    flag, call = {
        "trainer": ("isTrainer", "registerTrainer"),
        "aggregator": ("isAggregator", "registerAggregator"),
    }[role]
    if not rounds.view(flag, account.address):
        rounds.send(account, call)


@dataclass(frozen=True)
class TrainResult:
    """A trainer's stored update: its CID and the report submitted with it."""

    cid: str
    info: UpdateInfo


Work = Callable[[int, int, str], "Future[TrainResult]"]  # (client id, round, model CID)


@dataclass
class TrainerNode:
    pid: int
    account: LocalAccount
    rounds: RoundsContract
    work: Work
    crashed: bool = False
    results: dict[int, TrainResult] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.account.address

    def join(self) -> TrainerNode:
        join(self.rounds, self.account, "trainer")
        return self

    def on_event(self, event: dict) -> None:
        if (
            event["event"] == "RoundStarted"
            and self.address in event["trainers"]
            and not _stale(self.rounds, event)
        ):
            self._start(int(event["round"]), event["model"])

    def catch_up(self) -> None:
        """After a restart: if this round wants our update and we have not sent it, train now."""
        r = self.rounds.view("round")
        if (
            self.rounds.phase() == "WaitingForUpdates"
            and self.rounds.view("isSelectedTrainer", r, self.address)
            and not self.rounds.view("hasSubmittedUpdate", r, self.address)
        ):
            self._start(r, self.rounds.view("model"))

    def _start(self, round_: int, model: str) -> None:
        if self.crashed or self.rounds.view("hasSubmittedUpdate", round_, self.address):
            return
        future = self.work(self.pid, round_, model)
        future.add_done_callback(lambda f: self._submit(round_, f))

    def _submit(self, round_: int, future: Future) -> None:
        if self.crashed:
            return
        try:
            result: TrainResult = future.result()
        except Exception as exc:  # a failed local round: nothing is submitted, the deadline covers it
            log.warning("trainer %d: local training failed in round %d: %s", self.pid, round_, exc)
            return
        try:
            info = result.info
            self.rounds.send(self.account, "submitUpdate", result.cid, info.num_examples, info.to_json())
            self.results[round_] = result
        except LedgerError as err:
            log.warning("trainer %d: update for round %d not accepted: %s", self.pid, round_, err)


@dataclass(frozen=True)
class Submitted:
    """An ``UpdateSubmitted`` event: who, the update's CID, its example count on chain, its report."""

    trainer: str
    cid: str
    data_points: int
    metrics: str


@dataclass
class AggregatorNode:
    """``strategy`` is a fedsynth/Flower strategy (``aggregate_train``); ``trainable`` is
    ``train.trainable``: every other key is frozen, taken from the round's model whatever an
    update holds (trainers upload only the trained keys); ``corrupt`` makes a faulty node that
    submits a wrong result (tests)."""

    index: int
    account: LocalAccount
    rounds: RoundsContract
    store: ContentStore
    strategy: Any
    weight_key: str = "num-examples"
    trainable: str = ""
    corrupt: bool = False
    crashed: bool = False
    models: dict[int, str] = field(default_factory=dict)
    updates: dict[int, list[Submitted]] = field(default_factory=dict)
    rejected: dict[int, list[dict]] = field(default_factory=dict)
    submitted: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls, cfg: Config, index: int, account: LocalAccount, rounds: RoundsContract, store: ContentStore
    ) -> AggregatorNode:
        """The aggregator ``cfg`` describes (its strategy, weighting and trained keys), not joined yet."""
        weight_key = WEIGHT_KEYS[cfg.federation.weighting]
        return cls(index, account, rounds, store, build_strategy(cfg), weight_key, cfg.trained_modules)

    @property
    def address(self) -> str:
        return self.account.address

    def join(self) -> AggregatorNode:
        join(self.rounds, self.account, "aggregator")
        return self

    def on_event(self, event: dict) -> None:
        kind, r = event["event"], int(event.get("round", 0))
        if kind == "RoundStarted" and self.address in event["aggregators"]:
            self.models[r], self.updates[r] = event["model"], []
        elif kind == "UpdateSubmitted" and r in self.updates:
            self.updates[r].append(
                Submitted(event["trainer"], event["cid"], int(event["dataPoints"]), event["metrics"])
            )
        elif (
            kind == "UpdatesClosed"
            and r in self.updates
            and not self.crashed
            and not _stale(self.rounds, event)
        ):
            self._aggregate(r)

    def _aggregate(self, round_: int) -> None:
        global_w = self.store.get_weights(self.models[round_])
        frozen = {k: global_w[k] for k in frozen_keys(self.trainable, global_w)}
        updates, rejected = [], []
        for sub in sorted(self.updates[round_], key=lambda u: u.trainer.lower()):
            try:
                updates.append(self._usable(sub, global_w, frozen))
            except FedsynthError as err:
                rejected.append({"trainer": sub.trainer, "reason": str(err)})
                log.warning("aggregator %d: ignoring update of %s: %s", self.index, sub.trainer, err)
        self.rejected[round_] = rejected
        if not updates:
            log.warning("aggregator %d: round %d has no usable update", self.index, round_)
            return
        self.strategy.begin_round(ArrayRecord({FLAT: torch.from_numpy(flatten(global_w, global_w))}))
        result = unflatten(aggregate(self.strategy, round_, updates, [FLAT])[FLAT].numpy(), global_w)
        if self.corrupt:
            result = {k: v + 1.0 if v.is_floating_point() else v for k, v in result.items()}
        cid = self.store.put_weights(result)
        self.submitted[round_] = cid
        if self.rounds.view("round") != round_ or self.rounds.phase() != "WaitingForAggregations":
            log.info("aggregator %d: round %d already decided; not submitting", self.index, round_)
            return
        self.rounds.send(self.account, "submitAggregation", cid)

    def _usable(self, sub: Submitted, global_w: Weights, frozen: Weights) -> Update:
        """The submitted update, fetched (CID-verified), completed with the ``frozen`` weights
        (they replace any the update holds), validated and flattened; raises with the reason
        when it cannot be used. The example count is the one recorded on chain."""
        try:
            info = UpdateInfo.from_json(sub.metrics)
        except (KeyError, TypeError, ValueError) as err:
            raise FedsynthError(f"malformed update metrics: {err}") from err
        info = replace(info, num_examples=sub.data_points)
        if info.num_examples <= 0:
            raise FedsynthError(f"invalid num-examples: {info.num_examples}")
        flat = flatten({**self.store.get_weights(sub.cid), **frozen}, global_w)
        return Update(info, {FLAT: torch.from_numpy(flat)})


FLAT = "flat"


def flatten(weights: Weights, reference: Weights) -> np.ndarray:
    """All of ``weights`` as one float32 vector in ``reference``'s key order, after checking
    keys, shapes and finiteness (a bad update raises with the reason).

    The strategies allowed in the decentralized paradigm are coordinate-wise (FedAvg(M),
    FedMedian, FedTrimmedAvg, FedAdam/Yogi/Adagrad, FedProx's server side) or use distances
    over all parameters (Krum, MultiKrum, Bulyan), so aggregating one vector gives the same
    numbers as aggregating per key — and one array instead of hundreds per message."""
    expected = Expected({k: tuple(v.shape) for k, v in reference.items()})
    if reason := check_arrays({k: v.numpy() for k, v in weights.items()}, expected):
        raise FedsynthError(reason)
    return torch.cat([weights[k].reshape(-1).to(torch.float32) for k in reference]).numpy()


def unflatten(flat: np.ndarray, reference: Weights) -> Weights:
    out, start = {}, 0
    for k, v in reference.items():
        out[k] = torch.from_numpy(flat[start : start + v.numel()].copy()).reshape(v.shape).to(v.dtype)
        start += v.numel()
    if start != flat.size:
        raise FedsynthError(f"aggregate has {flat.size} values, the model {start}")
    return out

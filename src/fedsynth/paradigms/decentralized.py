"""Stage 2 (decentralized paradigm): rounds coordinated by a smart contract, no central
aggregator (Senden 2025's third paradigm, BlockLearning's protocol).

The model owner deploys ``rounds.vy`` with the initial model's CID; trainers and
aggregators self-register (``ledger/federation.py``). Per round the owner selects
trainers (seeded, as in the federated paradigm) and names the aggregators; trainers train
and submit update CIDs; aggregators aggregate independently; the contract ends the round
when more than half of them agree on one CID, and the owner terminates it. The owner is a
:class:`~fedsynth.training.round_loop.RoundDriver`, so the run directory (metrics per round with gas,
transactions, bytes moved and per-phase seconds; checkpoints; the final model) is written
by the same loop as the other paradigms.

In simulation every node lives in this process (trainers' local training in a process
pool, like Flower's simulation workers); across machines each node runs
``fedsynth node …`` against the same JSON-RPC chain and store (docs/methods/decentralized.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from functools import partial
from typing import Any

import torch

from fedsynth.config import Config, trained_keys
from fedsynth.core.protocol import UpdateInfo, config_text
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, resolve_device
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.ledger.federation import Counters, DecentralizedError, Federation, after_deadline, federation
from fedsynth.ledger.nodes import AggregatorNode
from fedsynth.runtime.ledger_node import default_executor, train_update
from fedsynth.stages.checkpoint import Checkpoint
from fedsynth.stages.prepare import Prepared
from fedsynth.training.round_loop import (
    Dropped,
    Model,
    RoundRecord,
    ServerEma,
    Tick,
    run_rounds,
    select_clients,
)

# ----------------------------------------------------------------- the owner


class DecentralizedDriver(ServerEma):
    """The model owner: starts, closes and terminates rounds through the contract."""

    units_per_round = 1

    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        model: Model,
        work: Callable,
        aggregator_setup: Callable[[AggregatorNode], None] | None = None,
        trainer_setup: Callable[[Federation], None] | None = None,
    ) -> None:
        self.cfg, self.run, self.model, self.work = cfg, run, model, work
        self.label = "decentralized " + cfg.strategy.name
        self.aggregator_setup, self.trainer_setup = aggregator_setup, trainer_setup
        self.round = 0
        self.strategy_state: dict | None = None
        self.fed: Federation | None = None
        self.agreed = ""

    def weights(self) -> dict[str, torch.Tensor]:
        """What a round model on the ledger holds: the tensors that train (all, or
        ``train.trainable``'s and the LoRA adapters); every node has the frozen rest from its
        own starting model, so neither a download nor an upload carries it."""
        state = self.model.net.state_dict()
        return {k: state[k].detach().cpu().clone() for k in trained_keys(self.cfg.trained_modules, state)}

    def resume(self, checkpoint: Checkpoint) -> None:
        self.model.net, self.model.ema, self.round = checkpoint.unet, checkpoint.ema, checkpoint.round
        state = checkpoint.state
        # checkpoints written before one state layout for all paradigms kept it as "strategy"
        self.strategy_state = state["strategies"]["flat"] if "strategies" in state else state.get("strategy")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """A freshly deployed contract whose initial model is the current one (a resumed run
        continues the round numbers), with the nodes registered."""
        with federation(
            self.cfg,
            self.run,
            self.weights(),
            self.work,
            rounds_done=self.round,
            aggregator_setup=self.aggregator_setup,
        ) as fed:
            if self.strategy_state is not None:
                for a in fed.aggregators:
                    a.strategy.load_state_dict(self.strategy_state)
            if self.trainer_setup is not None:
                self.trainer_setup(fed)
            self.fed = fed
            yield

    def _federation(self) -> Federation:
        if self.fed is None:
            raise RuntimeError("DecentralizedDriver.session() must be entered before rounds run")
        return self.fed

    def state_dict(self) -> dict[str, Any]:
        fed = self._federation()
        honest = next((a for a in fed.aggregators if a.submitted.get(self.round) == self.agreed), None)
        return {"strategies": {"flat": honest.strategy.state_dict()} if honest else {}}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"model_cid": self.agreed, "contract": self._federation().rounds.address}

    def run_round(self, tick: Tick) -> RoundRecord:
        """One round through the contract."""
        cfg, fed, round_ = self.cfg, self._federation(), self.round + 1
        selected = select_clients(
            cfg.seed, round_, 0, cfg.partition.num_clients, cfg.federation.clients_per_round
        )
        counters = Counters.read(fed)
        start = time.perf_counter()
        agreed, closed = self._start_and_wait(fed, round_, selected)
        aggregated = time.perf_counter()
        fed.rounds.send(fed.owner, "terminateRound")
        self.model.load_weights({**self.model.net.state_dict(), **fed.store.get_weights(agreed["cid"])})
        self.model.ema.step_with(self.model.net)
        self.round, self.agreed = round_, agreed["cid"]
        end = time.perf_counter()
        record = round_record(fed, round_, selected, agreed, end - start)
        phases = {
            "updates": closed - start,
            "aggregation": aggregated - closed,
            "termination": end - aggregated,
        }
        record.extra["phase_s"] = phases
        totals = counters.since(fed, record.bytes_up, record.bytes_down)
        record.bytes_up, record.bytes_down = totals.pop("bytes_up"), totals.pop("bytes_down")
        record.extra.update(totals)
        tick(1, record.train_loss)
        return record

    def _start_and_wait(self, fed: Federation, round_: int, selected: list[int]) -> tuple[dict, float]:
        """Start the round, close it at the update deadline if needed, wait for a majority.
        Returns the ``AggregationAgreed`` event and when updates closed."""
        led = self.cfg.ledger
        fed.rounds.send(
            fed.owner,
            "startRound",
            [fed.trainer_addresses[p] for p in selected],
            fed.aggregator_addresses,
            math.ceil(led.update_timeout),
            math.ceil(led.aggregation_timeout),
        )
        if (r := int(fed.rounds.view("round"))) != round_:
            raise DecentralizedError(f"the contract is at round {r}, the run at round {round_}")
        if fed.log.wait(round_, "UpdatesClosed", led.update_timeout, fed.feed) is None:
            self._close_late(fed, round_)
        closed = time.perf_counter()
        agreed = fed.log.wait(round_, "AggregationAgreed", led.aggregation_timeout, fed.feed)
        if agreed is None:
            after_deadline(fed, "cancelRound", "no majority of aggregators")
            raise DecentralizedError(
                f"round {round_}: no majority of the {len(fed.aggregator_addresses)} aggregators agreed "
                f"within ledger.aggregation_timeout = {led.aggregation_timeout} s; last checkpoint kept"
            )
        return agreed, closed

    def _close_late(self, fed: Federation, r: int) -> None:
        """The update deadline passed: proceed with what arrived, or cancel if nothing did."""
        if not fed.log.of(r, "UpdateSubmitted"):
            after_deadline(fed, "cancelRound", "no update arrived")
            raise DecentralizedError(
                f"round {r}: no trainer submitted an update within "
                f"ledger.update_timeout = {self.cfg.ledger.update_timeout} s; last checkpoint kept"
            )
        after_deadline(fed, "closeUpdates")
        fed.log.wait(r, "UpdatesClosed", 30.0, fed.feed)

    def finish(self) -> None:
        fed = self._federation()
        self.run.update_summary(
            deploy_gas=fed.deploy_gas,
            gas=fed.chain.gas_used,
            transactions=fed.chain.transactions,
            contract=fed.rounds.address,
            chain=fed.chain.kind,
        )


def round_record(fed: Federation, r: int, selected: list[int], agreed: dict, wall: float) -> RoundRecord:
    """The round's metrics line; client ids are the trainers' registration order. Rejection
    reasons are known for aggregators in this process (external ones log their own)."""
    client = {a.lower(): i for i, a in enumerate(fed.trainer_addresses)}
    updates = [(client[e["trainer"].lower()], e) for e in fed.log.of(r, "UpdateSubmitted")]
    infos = {c: _reported(e) for c, e in updates}
    honest = next((a for a in fed.aggregators if a.submitted.get(r) == agreed["cid"]), None)
    rejected = [
        Dropped(client[x["trainer"].lower()], f"update rejected by aggregators: {x['reason']}")
        for x in (honest.rejected.get(r, []) if honest else [])
    ]
    used = [c for c, _ in updates if c not in {d.client for d in rejected}]
    weights = [infos[c].num_examples for c in used] or [1]
    losses = [infos[c].train_loss for c in used] or [float("nan")]
    late = [Dropped(p, "no update before ledger.update_timeout") for p in selected if p not in infos]
    extra = {
        "train_loss_per_client": {c: i.train_loss for c, i in infos.items()},
        "client_compute_s": {c: i.compute_s for c, i in infos.items()},
        "examples_per_client": {c: i.num_examples for c, i in infos.items()},
        "selected": selected,
        "model_cid": agreed["cid"],
        "votes": int(agreed["votes"]),
        "aggregations": len(fed.log.of(r, "AggregationSubmitted")),
    }
    return RoundRecord(
        round=r,
        train_loss=sum(w * v for w, v in zip(weights, losses, strict=False)) / sum(weights),
        wall_s=wall,
        bytes_up=sum(i.bytes_up for i in infos.values()),
        bytes_down=sum(i.bytes_down for i in infos.values()),
        clients=sorted(used),
        dropped=late + rejected,
        extra=extra,
    )


def _reported(event: dict) -> UpdateInfo:
    """A trainer's report from its ``UpdateSubmitted`` event; the example count is the chain's.
    An unreadable report counts as zero compute and transfers, with a NaN loss."""
    try:
        info = UpdateInfo.from_json(event["metrics"])
    except (KeyError, TypeError, ValueError):
        info = UpdateInfo(-1, 0, 0, float("nan"), 0.0)
    return UpdateInfo(
        info.client,
        int(event["dataPoints"]),
        info.num_steps,
        info.train_loss,
        info.compute_s,
        bytes_down=info.bytes_down,
        bytes_up=info.bytes_up,
    )


def train_decentralized(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    *,
    resume: bool,
    executor: Executor | None = None,
    aggregator_setup: Callable[[AggregatorNode], None] | None = None,
    trainer_setup: Callable[[Federation], None] | None = None,
) -> None:
    """Run every round on a freshly deployed contract (a resumed run deploys a new one whose
    initial model is the checkpoint's); ``executor`` runs the trainers' local rounds."""
    full = prepared.data.full
    unet = seeded_unet(
        cfg.model, cfg.seed, full.shape[1], full.shape[0], full.num_classes, cfg.lora, full.class_names
    )
    unet = unet.to(resolve_device(cfg.train.device))
    model = Model(
        unet,
        make_ema(unet, cfg.federation.server_ema_decay, cfg.trained_modules),
        build_train_scheduler(cfg.diffusion),
    )
    pool = executor or default_executor(cfg)
    work = partial(pool.submit, train_update, config_text(cfg), cfg.ledger.store, str(run.root / "store"))
    try:
        driver = DecentralizedDriver(cfg, run, model, work, aggregator_setup, trainer_setup)
        run_rounds(driver, run, cfg, resume=resume)
    finally:
        if executor is None:
            pool.shutdown(cancel_futures=True)

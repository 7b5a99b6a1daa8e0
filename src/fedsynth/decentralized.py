"""Stage 2 (decentralized paradigm): rounds coordinated by a smart contract, no central
aggregator (seed 000's third paradigm, BlockLearning's protocol).

The model owner deploys ``rounds.vy`` with the initial model's CID; trainers and
aggregators self-register. Per round the owner selects trainers (seeded, as in the
federated paradigm) and names the aggregators; trainers train and submit update CIDs;
aggregators aggregate independently; the contract ends the round when more than half of
them agree on one CID, and the owner terminates it. The owner keeps the run directory:
metrics per round (gas, transactions, bytes moved, per-phase seconds), checkpoints and
the final model, so ``fedsynth evaluate`` / ``report`` / ``compare`` work unchanged.

In simulation every node lives in this process (trainers' local training in a process
pool, like Flower's simulation workers); across machines each node runs
``fedsynth node …`` against the same JSON-RPC chain and store (README).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import tomli_w
import torch
from diffusers import UNet2DModel

from fedsynth.checkpoint import load_latest_checkpoint, save_checkpoint, save_model
from fedsynth.config import Config, config_to_dict
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, resolve_device
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.errors import FedsynthError
from fedsynth.ledger.chain import (
    Chain,
    RoundsContract,
    dev_accounts,
    file_accounts,
    in_process_chain,
    rpc_chain,
)
from fedsynth.ledger.nodes import AggregatorNode, EventFeed, TrainerNode, TrainResult
from fedsynth.ledger.store import ContentStore, open_store
from fedsynth.prepare import Prepared
from fedsynth.progress import progress_bar
from fedsynth.rundir import RunDir, write_json_atomic
from fedsynth.server.loop import select_clients
from fedsynth.strategies import WEIGHT_KEYS, build_strategy


class DecentralizedError(FedsynthError):
    """A decentralized round could not complete (no update, no majority)."""


# ----------------------------------------------------------------- trainer work


def train_update(
    config_text: str,
    store_spec: str,
    store_dir: str,
    pid: int,
    round_: int,
    model: str,
    data_path: str = "",
    class_names: tuple[str, ...] = (),
) -> TrainResult:
    """One trainer's local round: fetch the model by CID, train, store the update.

    Runs in a worker process in simulation, or in a trainer node's own process."""
    from fedsynth.client.app import client_data, parse_config
    from fedsynth.client.local import local_train

    cfg = parse_config(config_text)
    threads = max(1, int(cfg.federation.client_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    store = open_store(store_spec, Path(store_dir))
    weights = store.get_weights(model)
    node_config = {"partition-id": pid, **({"data-path": data_path} if data_path else {})}
    _, data = client_data(config_text, node_config, class_names)
    update = local_train(cfg, data, weights, round_=round_, client_id=pid, state={})
    cid = store.put_weights(update.weights)
    return TrainResult(
        cid,
        update.num_examples,
        update.num_steps,
        update.train_loss,
        update.compute_s,
        store.bytes_out,
        store.bytes_in,
    )


def default_executor(cfg: Config) -> Executor:
    workers = cfg.ledger.trainer_workers or max(1, int((os.cpu_count() or 1) // cfg.federation.client_cpus))
    workers = min(workers, cfg.federation.clients_per_round)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


# ----------------------------------------------------------------- the federation


@dataclass
class RoundLog:
    """Events of the current chain round, in order, for the owner to wait on."""

    events: dict[int, list[dict]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_event(self, event: dict) -> None:
        with self.cond:
            self.events.setdefault(int(event.get("round", 0)), []).append(event)
            self.cond.notify_all()

    def of(self, round_: int, kind: str) -> list[dict]:
        with self.cond:
            return [e for e in self.events.get(round_, []) if e["event"] == kind]

    def wait(self, round_: int, kind: str, timeout: float, feed: EventFeed) -> dict | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (found := self.of(round_, kind)):
                if feed.errors:
                    raise feed.errors[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 1.0))
        return found[0]


@dataclass
class Federation:
    """What the owner works with. ``trainer_addresses[i]`` is client i; ``trainers`` and
    ``aggregators`` hold the node objects when the nodes run in this process (simulation)."""

    chain: Chain
    rounds: RoundsContract
    store: ContentStore
    owner: object
    trainer_addresses: list[str]
    aggregator_addresses: list[str]
    trainers: list[TrainerNode]
    aggregators: list[AggregatorNode]
    feed: EventFeed
    log: RoundLog
    deploy_gas: int


def accounts_for(cfg: Config, count: int):
    if cfg.ledger.keys_file:
        return file_accounts(cfg.ledger.keys_file, count)
    return dev_accounts(cfg.ledger.mnemonic, count)


def open_chain(cfg: Config) -> Chain:
    return rpc_chain(cfg.ledger.rpc_url) if cfg.ledger.rpc_url else in_process_chain()


@contextmanager
def federation(
    cfg: Config,
    run: RunDir,
    initial: dict[str, torch.Tensor],
    work: Callable,
    *,
    rounds_done: int = 0,
    aggregator_setup: Callable[[AggregatorNode], None] | None = None,
):
    """Deploy the contract, start the event feed and register the nodes: in this process
    (``ledger.nodes = "simulated"``), or wait for outside nodes to register (``"external"``)."""
    n, m = cfg.partition.num_clients, cfg.ledger.aggregators
    external = cfg.ledger.nodes == "external"
    chain = open_chain(cfg)
    accounts = accounts_for(cfg, 1 if external else 1 + n + m)
    chain.fund(accounts)
    store_dir = run.root / "store"
    store = open_store(cfg.ledger.store, store_dir)
    owner = accounts[0]
    rounds = RoundsContract.deploy(chain, owner, store.put_weights(initial), rounds_done)
    deploy_gas = chain.gas_used
    log = RoundLog()
    feed = EventFeed(rounds, from_block=chain.w3.eth.block_number)
    feed.listeners.append(log.on_event)
    trainers, aggregators = [], []
    if not external:
        trainers = [TrainerNode(i, accounts[1 + i], rounds, work).join() for i in range(n)]
        for j in range(m):
            node = AggregatorNode(
                j,
                accounts[1 + n + j],
                rounds,
                open_store(cfg.ledger.store, store_dir),
                build_strategy(cfg),
                weight_key=WEIGHT_KEYS[cfg.federation.weighting],
            )
            if aggregator_setup is not None:
                aggregator_setup(node)
            aggregators.append(node.join())
        feed.listeners += [*(t.on_event for t in trainers), *(a.on_event for a in aggregators)]
    feed.start()
    info = {
        "backend": chain.kind,
        "chain_id": chain.chain_id,
        "contract": rounds.address,
        "owner": owner.address,
        "store": cfg.ledger.store or str(store_dir),
        "deploy_gas": deploy_gas,
    }
    try:
        write_json_atomic(run.root / "ledger.json", info)  # node operators need the address now
        if external:
            announce(cfg, rounds)
        t_addr, a_addr = registered(log, feed, n, m, timeout=cfg.ledger.join_timeout)
        fed = Federation(
            chain, rounds, store, owner, t_addr, a_addr, trainers, aggregators, feed, log, deploy_gas
        )
        write_json_atomic(run.root / "ledger.json", {**info, "trainers": t_addr, "aggregators": a_addr})
        yield fed
    finally:
        feed.stop()


def announce(cfg: Config, rounds: RoundsContract) -> None:
    import sys

    print(
        f"contract {rounds.address} deployed; waiting for {cfg.partition.num_clients} trainers and "
        f"{cfg.ledger.aggregators} aggregators to register (fedsynth node trainer|aggregator "
        f"--contract {rounds.address} ...)",
        file=sys.stderr,
        flush=True,
    )


def registered(log: RoundLog, feed: EventFeed, n: int, m: int, timeout: float) -> tuple[list[str], list[str]]:
    """The first n trainers and m aggregators to register, in registration order."""
    deadline = time.monotonic() + timeout
    with log.cond:
        while True:
            events = log.of(0, "Registered")
            trainers = [e["node"] for e in events if e["role"] == 1][:n]
            aggregators = [e["node"] for e in events if e["role"] == 2][:m]
            if len(trainers) == n and len(aggregators) == m:
                return trainers, aggregators
            if feed.errors:
                raise feed.errors[0]
            if time.monotonic() > deadline:
                raise DecentralizedError(
                    f"only {len(trainers)} of {n} trainers and {len(aggregators)} of {m} aggregators "
                    f"registered within ledger.join_timeout = {timeout} s"
                )
            log.cond.wait(1.0)


# ----------------------------------------------------------------- the owner


@dataclass(frozen=True)
class _Counters:
    """Gas, transactions and store transfers seen in this process, to report per round."""

    gas: int
    transactions: int
    owner_down: int
    aggregators: tuple[tuple[int, int], ...]

    @classmethod
    def read(cls, fed: Federation) -> _Counters:
        stores = tuple((a.store.bytes_in, a.store.bytes_out) for a in fed.aggregators)
        return cls(fed.chain.gas_used, fed.chain.transactions, fed.store.bytes_out, stores)

    def since(self, fed: Federation, record: dict) -> dict:
        """Round totals: trainers' transfers (reported on chain, in ``record``) plus the
        aggregators' and the owner's measured here."""
        now = _Counters.read(fed)
        agg_up = sum(b[0] - a[0] for a, b in zip(self.aggregators, now.aggregators, strict=True))
        agg_down = sum(b[1] - a[1] for a, b in zip(self.aggregators, now.aggregators, strict=True))
        return {
            "bytes_up": record["bytes_up"] + agg_up,
            "bytes_down": record["bytes_down"] + agg_down + now.owner_down - self.owner_down,
            "aggregator_bytes_down": agg_down,
            "gas": now.gas - self.gas,
            "transactions": now.transactions - self.transactions,
        }


class Owner:
    """The model owner: starts, closes and terminates rounds; keeps the run directory."""

    def __init__(self, cfg: Config, run: RunDir, unet: UNet2DModel) -> None:
        self.cfg, self.run, self.unet = cfg, run, unet
        self.ema = make_ema(unet, cfg.diffusion.ema_decay)
        self.scheduler = build_train_scheduler(cfg.diffusion)
        self.round = 0
        self.strategy_state: dict | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}

    def resume(self) -> None:
        device = next(self.unet.parameters()).device
        ckpt = load_latest_checkpoint(self.run, self.cfg.diffusion.ema_decay, device)
        self.unet, self.ema, self.round = ckpt.unet, ckpt.ema, ckpt.round
        self.strategy_state = ckpt.state.get("strategy")
        self.run.truncate_metrics(self.round)

    def checkpoint(self, fed: Federation, agreed: str) -> None:
        honest = next((a for a in fed.aggregators if a.submitted.get(self.round) == agreed), None)
        state = {"strategy": honest.strategy.state_dict() if honest else None}
        meta = {"model_cid": agreed, "contract": fed.rounds.address}
        save_checkpoint(self.run, self.round, self.unet, self.ema, self.scheduler, state, meta)

    @staticmethod
    def _chain_round(fed: Federation) -> int:
        return int(fed.rounds.view("round"))

    def run_round(self, fed: Federation) -> tuple[dict, str]:
        """One round through the contract; returns its metrics line and the agreed CID."""
        cfg = self.cfg
        round_ = self.round + 1
        selected = select_clients(
            cfg.seed, round_, 0, cfg.partition.num_clients, cfg.federation.clients_per_round
        )
        counters = _Counters.read(fed)
        start = time.perf_counter()
        agreed, closed = self._start_and_wait(fed, round_, selected)
        aggregated = time.perf_counter()
        fed.rounds.send(fed.owner, "terminateRound")
        new = fed.store.get_weights(agreed["cid"])
        device = next(self.unet.parameters()).device
        self.unet.load_state_dict({k: v.to(device) for k, v in new.items()}, strict=True)
        self.ema.step(self.unet.parameters())
        self.round = round_
        end = time.perf_counter()
        record = self._record(fed, round_, selected, agreed)
        phases = {
            "updates": closed - start,
            "aggregation": aggregated - closed,
            "termination": end - aggregated,
        }
        return {**record, "wall_s": end - start, "phase_s": phases, **counters.since(fed, record)}, agreed[
            "cid"
        ]

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
        if (r := self._chain_round(fed)) != round_:
            raise DecentralizedError(f"the contract is at round {r}, the run at round {round_}")
        if fed.log.wait(round_, "UpdatesClosed", led.update_timeout, fed.feed) is None:
            self._close_late(fed, round_)
        closed = time.perf_counter()
        agreed = fed.log.wait(round_, "AggregationAgreed", led.aggregation_timeout, fed.feed)
        if agreed is None:
            _after_deadline(fed, "cancelRound", "no majority of aggregators")
            raise DecentralizedError(
                f"round {round_}: no majority of the {len(fed.aggregator_addresses)} aggregators agreed "
                f"within ledger.aggregation_timeout = {led.aggregation_timeout} s; last checkpoint kept"
            )
        return agreed, closed

    def _close_late(self, fed: Federation, r: int) -> None:
        """The update deadline passed: proceed with what arrived, or cancel if nothing did."""
        if not fed.log.of(r, "UpdateSubmitted"):
            _after_deadline(fed, "cancelRound", "no update arrived")
            raise DecentralizedError(
                f"round {self.round + 1}: no trainer submitted an update within "
                f"ledger.update_timeout = {self.cfg.ledger.update_timeout} s; last checkpoint kept"
            )
        _after_deadline(fed, "closeUpdates")
        fed.log.wait(r, "UpdatesClosed", 30.0, fed.feed)

    def _record(self, fed: Federation, r: int, selected: list[int], agreed: dict) -> dict:
        """The round's metrics line; client ids are the trainers' registration order. Rejection
        reasons are known for aggregators in this process (external ones log their own)."""
        client = {a.lower(): i for i, a in enumerate(fed.trainer_addresses)}
        updates = [
            (client[e["trainer"].lower()], e, json.loads(e["metrics"]))
            for e in fed.log.of(r, "UpdateSubmitted")
        ]
        honest = next((a for a in fed.aggregators if a.submitted.get(r) == agreed["cid"]), None)
        rejected = [
            {
                "client": client[x["trainer"].lower()],
                "reason": f"update rejected by aggregators: {x['reason']}",
            }
            for x in (honest.rejected.get(r, []) if honest else [])
        ]
        bad = {x["client"] for x in rejected}
        used = [(c, e, m) for c, e, m in updates if c not in bad]
        weights = [int(e["dataPoints"]) for _, e, _ in used] or [1]
        losses = [float(m["loss"]) for _, _, m in used] or [float("nan")]
        sent = {c for c, _, _ in updates}
        dropped = [
            {"client": p, "reason": "no update before ledger.update_timeout"}
            for p in selected
            if p not in sent
        ]
        return {
            "round": self.round,
            "train_loss": sum(w * v for w, v in zip(weights, losses, strict=False)) / sum(weights),
            "train_loss_per_client": {c: float(m["loss"]) for c, _, m in updates},
            "client_compute_s": {c: float(m["s"]) for c, _, m in updates},
            "examples_per_client": {c: int(e["dataPoints"]) for c, e, _ in updates},
            "bytes_up": sum(int(m["up"]) for _, _, m in updates),
            "bytes_down": sum(int(m["down"]) for _, _, m in updates),
            "clients": sorted(c for c, _, _ in used),
            "selected": selected,
            "dropped": dropped + rejected,
            "model_cid": agreed["cid"],
            "votes": int(agreed["votes"]),
            "aggregations": len(fed.log.of(r, "AggregationSubmitted")),
        }


def _after_deadline(fed: Federation, call: str, *args) -> None:
    """An owner call allowed once a deadline passed; the chain's clock may lag ours a little."""
    for attempt in range(10):
        try:
            fed.rounds.send(fed.owner, call, *args)
            return
        except FedsynthError as err:
            if "deadline not reached" not in str(err) or attempt == 9:
                raise
            time.sleep(1.0)


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
    unet = seeded_unet(cfg.model, cfg.seed, full.shape[1], full.shape[0], full.num_classes)
    owner = Owner(cfg, run, unet.to(resolve_device(cfg.train.device)))
    if resume:
        owner.resume()
    config_text = tomli_w.dumps(config_to_dict(cfg))
    pool = executor or default_executor(cfg)
    work = partial(pool.submit, train_update, config_text, cfg.ledger.store, str(run.root / "store"))
    try:
        with federation(
            cfg, run, owner.weights(), work, rounds_done=owner.round, aggregator_setup=aggregator_setup
        ) as fed:
            if owner.strategy_state is not None:
                for a in fed.aggregators:
                    a.strategy.load_state_dict(owner.strategy_state)
            if trainer_setup is not None:
                trainer_setup(fed)
            _rounds(cfg, run, owner, fed)
    finally:
        if executor is None:
            pool.shutdown(cancel_futures=True)
    save_model(run, owner.unet, owner.ema, owner.scheduler)


def _rounds(cfg: Config, run: RunDir, owner: Owner, fed: Federation) -> None:
    total = cfg.federation.rounds
    with progress_bar("decentralized " + cfg.strategy.name, total=total) as bar:
        bar.advance(owner.round)
        while owner.round < total:
            record, agreed = owner.run_round(fed)
            run.append_metrics(record)
            if owner.round % cfg.federation.checkpoint_every == 0 or owner.round == total:
                owner.checkpoint(fed, agreed)
            bar.advance(1, record["train_loss"])
    run.update_summary(
        deploy_gas=fed.deploy_gas,
        gas=fed.chain.gas_used,
        transactions=fed.chain.transactions,
        contract=fed.rounds.address,
        chain=fed.chain.kind,
    )


# ----------------------------------------------------------------- a node on its own


def run_node(
    cfg: Config,
    role: str,
    contract: str,
    key: str,
    *,
    partition_id: int = 0,
    data_path: str = "",
    class_names: tuple[str, ...] = (),
    store_dir: Path = Path("fedsynth-store"),
) -> int:
    """Run one trainer or aggregator against a deployed contract until the run's last round
    terminates; returns the rounds it took part in. Restarting it rejoins the run."""
    from concurrent.futures import ThreadPoolExecutor

    from eth_account import Account

    from fedsynth.errors import ConfigError

    if role not in ("trainer", "aggregator"):
        raise ConfigError(f"node role {role!r} is not valid; choose: trainer, aggregator")
    if not cfg.ledger.rpc_url:
        raise ConfigError("a node needs ledger.rpc_url (the chain the owner deployed the contract on)")
    if data_path and not class_names:
        raise ConfigError("--data-path needs --classes: the federation's class names, in order")
    rounds = RoundsContract(open_chain(cfg), contract)
    account = Account.from_key(key)
    done = threading.Event()
    feed = EventFeed(rounds, from_block=0)  # replays history: a restarted node catches up
    feed.listeners.append(
        lambda e: (
            done.set() if e["event"] == "RoundTerminated" and e["round"] >= cfg.federation.rounds else None
        )
    )
    with ThreadPoolExecutor(1) as pool:
        if role == "trainer":
            text = tomli_w.dumps(config_to_dict(cfg))
            job = partial(train_update, text, cfg.ledger.store, str(store_dir))
            node = TrainerNode(
                partition_id,
                account,
                rounds,
                lambda pid, r, model: pool.submit(job, pid, r, model, data_path, class_names),
            ).join()
        else:
            store = open_store(cfg.ledger.store, store_dir)
            node = AggregatorNode(
                0, account, rounds, store, build_strategy(cfg), WEIGHT_KEYS[cfg.federation.weighting]
            )
            node.join()
        feed.listeners.append(node.on_event)
        feed.start()
        try:
            while not done.wait(1.0):
                if feed.errors:
                    raise feed.errors[0]
        finally:
            feed.stop()
    return len(node.results if role == "trainer" else node.submitted)

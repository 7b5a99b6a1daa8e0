"""The decentralized federation's set-up on a chain: the contract deployed, the event feed
started, the nodes registered (in this process, or outside nodes awaited), and the owner's
view of each round's events (:class:`RoundLog`)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsynth.config import Config
from fedsynth.core.errors import FedsynthError
from fedsynth.core.rundir import RunDir, write_json_atomic
from fedsynth.ledger.chain import (
    Chain,
    RoundsContract,
    dev_accounts,
    file_accounts,
    in_process_chain,
    rpc_chain,
)
from fedsynth.ledger.nodes import AggregatorNode, EventFeed, TrainerNode
from fedsynth.ledger.store import ContentStore, open_store


class DecentralizedError(FedsynthError):
    """A decentralized round could not complete (no update, no majority)."""


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
        trainers, aggregators = simulated_nodes(cfg, accounts[1:], rounds, work, store_dir, aggregator_setup)
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


def simulated_nodes(
    cfg: Config,
    accounts: list,
    rounds: RoundsContract,
    work: Callable,
    store_dir: Path,
    aggregator_setup: Callable[[AggregatorNode], None] | None,
) -> tuple[list[TrainerNode], list[AggregatorNode]]:
    """Every trainer and aggregator in this process, registered (``accounts``: n then m)."""
    n, m = cfg.partition.num_clients, cfg.ledger.aggregators
    trainers = [TrainerNode(i, accounts[i], rounds, work).join() for i in range(n)]
    aggregators = []
    for j in range(m):
        node = AggregatorNode.from_config(
            cfg, j, accounts[n + j], rounds, open_store(cfg.ledger.store, store_dir)
        )
        if aggregator_setup is not None:
            aggregator_setup(node)
        aggregators.append(node.join())
    return trainers, aggregators


def announce(cfg: Config, rounds: RoundsContract) -> None:
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


def after_deadline(fed: Federation, call: str, *args) -> None:
    """An owner call allowed once a deadline passed; the chain's clock may lag ours a little."""
    for attempt in range(10):
        try:
            fed.rounds.send(fed.owner, call, *args)
            return
        except FedsynthError as err:
            if "deadline not reached" not in str(err) or attempt == 9:
                raise
            time.sleep(1.0)


@dataclass(frozen=True)
class Counters:
    """Gas, transactions and store transfers seen in this process, to report per round."""

    gas: int
    transactions: int
    owner_down: int
    aggregators: tuple[tuple[int, int], ...]

    @classmethod
    def read(cls, fed: Federation) -> Counters:
        stores = tuple((a.store.bytes_in, a.store.bytes_out) for a in fed.aggregators)
        return cls(fed.chain.gas_used, fed.chain.transactions, fed.store.bytes_out, stores)

    def since(self, fed: Federation, trainers_up: int, trainers_down: int) -> dict:
        """Round totals: trainers' transfers (reported on chain, in ``record``) plus the
        aggregators' and the owner's measured here."""
        now = Counters.read(fed)
        agg_up = sum(b[0] - a[0] for a, b in zip(self.aggregators, now.aggregators, strict=True))
        agg_down = sum(b[1] - a[1] for a, b in zip(self.aggregators, now.aggregators, strict=True))
        return {
            "bytes_up": trainers_up + agg_up,
            "bytes_down": trainers_down + agg_down + now.owner_down - self.owner_down,
            "aggregator_bytes_down": agg_down,
            "gas": now.gas - self.gas,
            "transactions": now.transactions - self.transactions,
        }

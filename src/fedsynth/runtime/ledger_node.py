"""The trainer's local round on a ledger, and ``fedsynth node``: one trainer or aggregator
of a decentralized run on its own machine.

:func:`train_update` is a trainer's work in every setting: in the owner's process pool
(simulation) and in a node's own process. :func:`run_node` joins a deployed contract and
serves until the run's last round terminates; restarting it rejoins the run.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from fedsynth.client.app import client_data, set_threads, update_info
from fedsynth.client.local import local_train
from fedsynth.config import Config
from fedsynth.core.errors import ConfigError
from fedsynth.core.protocol import DATA_PATH, PARTITION_ID, config_text, parse_config
from fedsynth.exchange.groups import frozen_keys
from fedsynth.ledger.chain import RoundsContract
from fedsynth.ledger.federation import open_chain
from fedsynth.ledger.nodes import AggregatorNode, EventFeed, TrainerNode, TrainResult
from fedsynth.ledger.store import open_store


def train_update(
    text: str,
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
    cfg = parse_config(text)
    set_threads(cfg)
    store = open_store(store_spec, Path(store_dir))
    weights = store.get_weights(model)
    node_config = {PARTITION_ID: pid, **({DATA_PATH: data_path} if data_path else {})}
    _, data = client_data(text, node_config, class_names)
    update = local_train(cfg, data, weights, round_=round_, client_id=pid, state={})
    frozen = frozen_keys(cfg.trained_modules, update.weights)  # the aggregators keep the round model's
    cid = store.put_weights({k: v for k, v in update.weights.items() if k not in frozen})
    return TrainResult(cid, update_info(update, pid, bytes_down=store.bytes_out, bytes_up=store.bytes_in))


def default_executor(cfg: Config) -> Executor:
    workers = cfg.ledger.trainer_workers or max(1, int((os.cpu_count() or 1) // cfg.federation.client_cpus))
    workers = min(workers, cfg.federation.clients_per_round)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _check_node(cfg: Config, role: str, data_path: str, class_names: tuple[str, ...]) -> None:
    if role not in ("trainer", "aggregator"):
        raise ConfigError(f"node role {role!r} is not valid; choose: trainer, aggregator")
    if not cfg.ledger.rpc_url:
        raise ConfigError("a node needs ledger.rpc_url (the chain the owner deployed the contract on)")
    if data_path and not class_names:
        raise ConfigError("--data-path needs --classes: the federation's class names, in order")


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
    from eth_account import Account  # web3's account tooling: loaded only for a node

    _check_node(cfg, role, data_path, class_names)
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
            job = partial(train_update, config_text(cfg), cfg.ledger.store, str(store_dir))
            work = lambda pid, r, model: pool.submit(job, pid, r, model, data_path, class_names)  # noqa: E731
            node = TrainerNode(partition_id, account, rounds, work).join()
        else:
            store = open_store(cfg.ledger.store, store_dir)
            node = AggregatorNode.from_config(cfg, 0, account, rounds, store).join()
        feed.listeners.append(node.on_event)
        feed.start()
        try:
            while not done.wait(1.0):
                if feed.errors:
                    raise feed.errors[0]
        finally:
            feed.stop()
    return len(node.results if role == "trainer" else node.submitted)

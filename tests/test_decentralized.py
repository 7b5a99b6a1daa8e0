"""Decentralized rounds end to end: honest rounds, faults survived, resume, a standalone node.

Most tests drive the real contract, store, event feed, nodes and owner with a fast fake
trainer (``work``): each trainer returns the model plus 0.01·(client id + 1) with
10·(client id + 1) data points, so FedAvg's result is known by hand.
"""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES
from fedsynth.config import config_from_dict, load_config
from fedsynth.core.errors import ConfigError
from fedsynth.core.protocol import UpdateInfo, config_text
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.ledger.federation import DecentralizedError
from fedsynth.ledger.nodes import TrainerNode, TrainResult
from fedsynth.ledger.store import open_store
from fedsynth.paradigms.decentralized import DecentralizedDriver, train_decentralized
from fedsynth.pipeline import run_all
from fedsynth.report.markdown import privacy_facts
from fedsynth.runtime.ledger_node import train_update
from fedsynth.runtime.processes import free_port
from fedsynth.stages.prepare import prepare
from fedsynth.training.round_loop import Model

ROOT = Path(__file__).resolve().parents[1]


def _cfg(clients: int = 3, **ledger):
    return config_from_dict(
        {
            "paradigm": "decentralized",
            "model": {"preset": "tiny"},
            "partition": {"scheme": "iid", "num_clients": clients},
            "federation": {"rounds": 2, "clients_per_round": clients, "checkpoint_every": 1},
            "strategy": {"name": "fedavg"},
            "ledger": {"aggregators": 3, "update_timeout": 30.0, "aggregation_timeout": 30.0, **ledger},
            "sample": {"per_class": 0},
        }
    )


def _fake_work(pool, store_dir: Path, behaviour: dict[int, str]):
    def work(pid: int, round_: int, model: str):
        def job() -> TrainResult:
            store = open_store("", store_dir)
            weights = store.get_weights(model)
            if behaviour.get(pid) == "raise":
                raise RuntimeError("out of memory")
            if behaviour.get(pid) == "nan":
                weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
            elif behaviour.get(pid) == "conv_out only":  # what a trainer with train.trainable uploads
                weights = {k: v + 0.01 * (pid + 1) for k, v in weights.items() if k.startswith("conv_out.")}
            else:
                weights = {k: v + 0.01 * (pid + 1) for k, v in weights.items()}
            cid = store.put_weights(weights)
            if behaviour.get(pid) == "tamper":
                blob = store.backend._path(cid)
                blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
            info = UpdateInfo(
                pid, 10 * (pid + 1), 1, 0.5, 0.0, bytes_down=store.bytes_out, bytes_up=store.bytes_in
            )
            return TrainResult(cid, info)

        return pool.submit(job)

    return work


@contextmanager
def harness(tmp_path, cfg, behaviour=None, aggregator_setup=None):
    run = RunDir(tmp_path / "run").create()
    unet = seeded_unet(cfg.model, cfg.seed, 16, 1, 10)
    model = Model(unet, make_ema(unet, 0.9), build_train_scheduler(cfg.diffusion))
    with ThreadPoolExecutor(4) as pool:
        work = _fake_work(pool, run.root / "store", behaviour or {})
        owner = DecentralizedDriver(cfg, run, model, work, aggregator_setup)
        with owner.session():
            yield owner, owner.fed


def one_round(owner: DecentralizedDriver) -> tuple[dict, str]:
    """(the round's metrics line, the agreed model CID)."""
    record = owner.run_round(lambda n, loss: None).to_json()
    return record, record["model_cid"]


def _expected(initial: dict, clients: list[int]) -> dict:
    n = [10 * (p + 1) for p in clients]
    shift = sum(0.01 * (p + 1) * w for p, w in zip(clients, n, strict=True)) / sum(n)
    return {k: v + shift for k, v in initial.items()}


def _close(weights: dict, expected: dict) -> bool:
    return all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in expected)


def test_honest_round_aggregators_agree_byte_for_byte(tmp_path):
    with harness(tmp_path, _cfg()) as (owner, fed):
        initial = owner.weights()
        record, agreed = one_round(owner)
        assert _close(owner.weights(), _expected(initial, [0, 1, 2]))
        assert {a.submitted[1] for a in fed.aggregators} == {agreed}  # all three: same bytes, same CID
        assert record["votes"] == 2 and record["clients"] == [0, 1, 2] and record["dropped"] == []
        assert fed.rounds.phase() == "Stopped" and fed.rounds.view("model") == agreed
        assert record["gas"] > 0 and record["transactions"] == 1 + 3 + 2 + 1  # start, 3 updates, 2 votes, end
        assert set(record["phase_s"]) == {"updates", "aggregation", "termination"}
        blob = len(fed.store.get(agreed))
        # trainers: 3 downloads + 3 uploads; aggregators: each 1 model + 3 updates down, 1 up; owner: 1 down
        assert record["bytes_up"] == 3 * blob + 3 * blob
        assert record["bytes_down"] == 3 * blob + 3 * 4 * blob + blob
        record2, _ = one_round(owner)
        assert record2["round"] == 2 == fed.rounds.view("round")


def test_frozen_weights_stay_the_round_models_whatever_an_update_holds(tmp_path):
    """``train.trainable``: trainer 0 uploads only the trained keys, trainers 1 and 2 shift every
    weight; the trained keys get FedAvg of all three, the frozen ones stay the round model's."""
    base = _cfg()
    cfg = replace(base, train=replace(base.train, trainable="conv_out"))
    with harness(tmp_path, cfg, behaviour={0: "conv_out only"}) as (owner, fed):
        initial = owner.weights()
        one_round(owner)
        after, expected = owner.weights(), _expected(initial, [0, 1, 2])
        trained = [k for k in initial if k.startswith("conv_out.")]
        assert trained and _close(after, {k: expected[k] for k in trained})
        assert _close(after, {k: v for k, v in initial.items() if k not in trained})
        assert sorted(fed.store.get_weights(fed.trainers[0].results[1].cid)) == sorted(trained)


def test_wrong_aggregator_is_outvoted(tmp_path):
    def corrupt_first(node):
        node.corrupt = node.index == 0

    with harness(tmp_path, _cfg(), aggregator_setup=corrupt_first) as (owner, fed):
        initial = owner.weights()
        record, agreed = one_round(owner)
        assert fed.aggregators[0].submitted[1] != agreed
        assert fed.aggregators[1].submitted[1] == fed.aggregators[2].submitted[1] == agreed
        assert record["votes"] == 2
        assert _close(owner.weights(), _expected(initial, [0, 1, 2]))


def test_silent_trainer_does_not_block_and_a_crashed_trainer_rejoins(tmp_path):
    with harness(tmp_path, _cfg(update_timeout=2.0)) as (owner, fed):
        initial = owner.weights()
        fed.trainers[1].crashed = True
        start = time.monotonic()
        record, _ = one_round(owner)
        assert time.monotonic() - start < 20
        assert record["clients"] == [0, 2]
        assert record["dropped"] == [{"client": 1, "reason": "no update before ledger.update_timeout"}]
        assert _close(owner.weights(), _expected(initial, [0, 2]))
        # the node comes back with the same key: registering again is a no-op, and it catches up
        old = fed.trainers[1]
        fed.feed.listeners.remove(old.on_event)
        fresh = TrainerNode(1, old.account, fed.rounds, old.work).join()
        fed.trainers[1] = fresh
        fed.feed.listeners.append(fresh.on_event)
        record, _ = one_round(owner)
        assert record["clients"] == [0, 1, 2] and record["dropped"] == []


def test_trainer_whose_training_fails_is_dropped_at_the_deadline(tmp_path):
    with harness(tmp_path, _cfg(update_timeout=2.0), behaviour={2: "raise"}) as (owner, _fed):
        initial = owner.weights()
        record, _ = one_round(owner)
        assert record["clients"] == [0, 1]
        assert record["dropped"] == [{"client": 2, "reason": "no update before ledger.update_timeout"}]
        assert _close(owner.weights(), _expected(initial, [0, 1]))


def test_restarted_trainer_catches_up_mid_round(tmp_path):
    with harness(tmp_path, _cfg(update_timeout=60.0)) as (owner, fed):
        fed.trainers[2].crashed = True
        result = {}
        thread = threading.Thread(target=lambda: result.update(record=one_round(owner)[0]))
        thread.start()
        while not fed.log.of(1, "UpdateSubmitted") or len(fed.log.of(1, "UpdateSubmitted")) < 2:
            time.sleep(0.05)
        fed.feed.listeners.remove(fed.trainers[2].on_event)
        fresh = TrainerNode(2, fed.trainers[2].account, fed.rounds, fed.trainers[2].work).join()
        fresh.catch_up()  # reads the contract: round 1 wants its update, none sent yet
        thread.join(timeout=30)
        assert result["record"]["clients"] == [0, 1, 2]
        assert result["record"]["wall_s"] < 30  # closed by the last update, not by the 60 s deadline


def test_tampered_and_nan_updates_are_ignored_with_reasons(tmp_path):
    with harness(tmp_path, _cfg(), behaviour={1: "tamper", 2: "nan"}) as (owner, _fed):
        initial = owner.weights()
        record, _ = one_round(owner)
        assert record["clients"] == [0]
        reasons = {d["client"]: d["reason"] for d in record["dropped"]}
        assert "does not match its CID" in reasons[1]
        assert "non-finite" in reasons[2]
        assert _close(owner.weights(), _expected(initial, [0]))


def test_no_majority_cancels_the_round_with_a_clear_error(tmp_path):
    def crash(node):
        node.crashed = True

    with harness(tmp_path, _cfg(aggregation_timeout=1.0), aggregator_setup=crash) as (owner, fed):
        before = owner.weights()
        with pytest.raises(DecentralizedError, match="no majority of the 3 aggregators"):
            one_round(owner)
        assert fed.rounds.phase() == "Stopped"
        assert _close(owner.weights(), before)


def test_no_update_at_all_is_a_clear_error(tmp_path):
    with harness(tmp_path, _cfg(update_timeout=1.0)) as (owner, fed):
        for t in fed.trainers:
            t.crashed = True
        with pytest.raises(DecentralizedError, match="no trainer submitted an update"):
            one_round(owner)
        assert fed.rounds.phase() == "Stopped"


def test_unsupported_options_are_refused():
    with pytest.raises(ConfigError, match=r"exchange\.codec = 'int8' is not available with paradigm"):
        config_from_dict({"paradigm": "decentralized", "exchange": {"codec": "int8"}})
    with pytest.raises(ConfigError, match="scaffold"):
        config_from_dict({"paradigm": "decentralized", "strategy": {"name": "scaffold"}})


# --------------------------------------------------------------------------- real training

DECENTRAL = [*TINY_OVERRIDES, 'paradigm="decentralized"', "ledger.aggregators=2", "ledger.trainer_workers=2"]
FROZEN = [*DECENTRAL, "train.trainable='conv_out'"]  # every other parameter keeps its weights


def test_a_trainer_uploads_only_the_trained_parameters(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits-centralized.toml", FROZEN)
    weights = seeded_unet(cfg.model, cfg.seed, 16, 1, 10).state_dict()
    store = open_store("", tmp_path)
    result = train_update(config_text(cfg), "", str(tmp_path), 0, 1, store.put_weights(weights))
    uploaded = store.get_weights(result.cid)
    assert sorted(uploaded) == sorted(k for k in weights if k.startswith("conv_out."))
    assert not torch.equal(uploaded["conv_out.weight"], weights["conv_out.weight"])  # it trained


@pytest.mark.slow
def test_fedsynth_run_decentralized_writes_the_usual_run_directory(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits-centralized.toml", DECENTRAL)
    run = run_all(cfg, tmp_path / "run")
    metrics = run.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["gas"] > 0 and m["transactions"] == 1 + 2 + 2 + 1 for m in metrics)
    summary = json.loads(run.summary.read_text())
    assert summary["paradigm"] == "decentralized" and summary["deploy_gas"] > 0
    assert {"fd", "cas_accuracy", "precision"} <= set(summary)
    assert (run.model / "unet").is_dir() and (run.root / "ledger.json").is_file()
    assert (run.root / "report.md").is_file() and list(run.synthetic.glob("*/*.png"))


@pytest.mark.slow
def test_resume_matches_uninterrupted(tmp_path):
    base = [*DECENTRAL, "sample.per_class=0", 'strategy.name="fedavgm"']
    full_cfg = load_config(ROOT / "configs" / "digits-centralized.toml", [*base, "federation.rounds=2"])
    first_cfg = load_config(ROOT / "configs" / "digits-centralized.toml", [*base, "federation.rounds=1"])
    with ThreadPoolExecutor(2) as pool:
        full = RunDir(tmp_path / "full").create()
        train_decentralized(full_cfg, full, prepare(full_cfg), resume=False, executor=pool)
        part = RunDir(tmp_path / "part").create()
        train_decentralized(first_cfg, part, prepare(first_cfg), resume=False, executor=pool)
        train_decentralized(full_cfg, part, prepare(full_cfg), resume=True, executor=pool)
    a = torch.load(full.latest_checkpoint() / "state.pt", weights_only=True)
    b = torch.load(part.latest_checkpoint() / "state.pt", weights_only=True)
    assert a["round"] == b["round"] == 2
    ma = (full.latest_checkpoint() / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    mb = (part.latest_checkpoint() / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert ma == mb


# --------------------------------------------------------------------------- a standalone node


def _anvil() -> str | None:
    local = ROOT / ".venv" / "anvil" / "node_modules" / ".bin" / "anvil"
    return str(local) if local.exists() else shutil.which("anvil")


MNEMONIC = "test test test test test test test test test test test junk"


@contextmanager
def anvil_node():
    """A standalone EVM node on a free loopback port (the dev mnemonic's accounts funded);
    yields its JSON-RPC URL and stops it afterwards."""
    port = free_port()
    cmd = [_anvil(), "--host", "127.0.0.1", "--port", str(port), "--accounts", "10", "--silent"]
    node = subprocess.Popen(
        [*cmd, "--mnemonic", MNEMONIC], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        node.terminate()
        node.wait(timeout=10)


@pytest.mark.skipif(_anvil() is None, reason="anvil is not installed (make install adds it when npm exists)")
def test_round_on_a_standalone_anvil_node(tmp_path):
    with anvil_node() as url, harness(tmp_path, _cfg(rpc_url=url)) as (owner, fed):
        assert fed.chain.kind == "rpc"
        initial = owner.weights()
        record, _ = one_round(owner)
        assert _close(owner.weights(), _expected(initial, [0, 1, 2]))
        assert record["votes"] == 2 and record["gas"] > 0


@pytest.mark.slow
@pytest.mark.skipif(_anvil() is None, reason="anvil is not installed (make install adds it when npm exists)")
def test_owner_and_nodes_as_separate_processes_on_loopback(tmp_path):
    """The multi-machine layout on one machine: anvil, the owner (`fedsynth run` with
    ledger.nodes = "external") and three `fedsynth node` processes sharing a store folder."""
    from fedsynth.ledger.chain import dev_accounts

    fedsynth = str(Path(sys.executable).with_name("fedsynth"))
    config = str(ROOT / "configs" / "digits-centralized.toml")
    keys = dev_accounts(MNEMONIC, 4)  # key 0 is the owner's
    procs: list[subprocess.Popen] = []

    def start(*cmd: str) -> subprocess.Popen:
        procs.append(
            subprocess.Popen([fedsynth, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
        return procs[-1]

    with anvil_node() as url:
        sets = [
            *TINY_OVERRIDES,
            'paradigm="decentralized"',
            'ledger.nodes="external"',
            f'ledger.rpc_url="{url}"',
            f'ledger.store="{tmp_path / "shared-store"}"',
            "ledger.aggregators=1",
            "ledger.join_timeout=120.0",
            "federation.rounds=1",
            "sample.per_class=0",
        ]
        args = [x for s in sets for x in ("--set", s)]
        try:
            owner = start("run", config, "--out", str(tmp_path / "run"), *args)
            ledger = tmp_path / "run" / "ledger.json"
            for _ in range(600):
                if ledger.is_file() or owner.poll() is not None:
                    break
                time.sleep(0.1)
            contract = json.loads(ledger.read_text())["contract"]
            for n, (role, pid) in enumerate((("trainer", 0), ("trainer", 1), ("aggregator", 0))):
                key = tmp_path / f"{role}{pid}.key"
                key.write_text(keys[1 + n].key.hex())
                start(
                    "node",
                    role,
                    "--config",
                    config,
                    "--contract",
                    contract,
                    "--key-file",
                    str(key),
                    "--partition-id",
                    str(pid),
                    *args,
                )
            out, _ = owner.communicate(timeout=300)
            assert owner.returncode == 0, out[-2000:]
            for node in procs[1:]:
                text, _ = node.communicate(timeout=60)
                assert node.returncode == 0, text[-2000:]
                assert "took part in 1 round(s)" in text
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["clients"] == [0, 1] and metrics[0]["votes"] == 1
    assert (tmp_path / "run" / "model" / "unet").is_dir()


def test_report_says_frozen_weights_are_not_uploaded(tmp_path):
    run = RunDir(tmp_path / "r").create()
    cfg = load_config(ROOT / "configs" / "digits-centralized.toml", FROZEN)
    run.config.write_text(config_text(cfg))
    assert (
        "every other parameter kept its initial weights; they never travelled: the ledger's round models "
        "and the trainers' updates held only the trained ones, every node built the rest itself"
        in "\n".join(privacy_facts(run, {}))
    )

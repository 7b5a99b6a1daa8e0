"""Federated runs on Flower's simulation engine: faults survived, clean stops, resume."""

import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsynth.client.app import handle_query, handle_train
from fedsynth.config import config_from_dict
from fedsynth.core.rundir import RunDir
from fedsynth.paradigms.federated import train_federated
from fedsynth.server.messages import FederationError
from fedsynth.stages.prepare import prepare

pytestmark = pytest.mark.slow


def tiny_federated(**federation) -> dict:
    return {
        "paradigm": "federated",
        "model": {"preset": "tiny"},
        "partition": {"scheme": "iid", "num_clients": federation.pop("num_clients", 3)},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"local_steps": 2, "batch_size": 16},
        "federation": {
            "rounds": 2,
            "clients_per_round": 3,
            "checkpoint_every": 1,
            "round_timeout": 30.0,
            **federation,
        },
        "sample": {"per_class": 0},
    }


def _corrupt(reply: Message, how: str) -> Message:
    arrays = reply.content["arrays"].to_torch_state_dict()
    key = next(iter(arrays))
    if how == "nan":
        arrays[key] = arrays[key].clone().fill_(float("nan"))
    elif how == "shape":
        arrays[key] = arrays[key].flatten()[:-1].clone()
    elif how == "missing":
        del arrays[key]
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


faulty = ClientApp()
faulty.query()(handle_query)


@faulty.train()
def faulty_train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == 0:
        raise RuntimeError("disk on fire")
    if pid == 4:
        time.sleep(26)  # past federation.round_timeout (20 s), and no longer: the run waits for it at its end
    reply = handle_train(msg, context)
    return _corrupt(reply, {1: "nan", 2: "shape", 3: "missing"}.get(pid, "none"))


def _run(tmp_path, raw, client_app=None, resume=False, name="run"):
    cfg = config_from_dict(raw)
    run = RunDir(tmp_path / name).create()
    prepared = prepare(cfg, run)
    train_federated(cfg, run, prepared, resume=resume, client_app=client_app)
    return run


def test_faulty_clients_are_dropped_with_reasons(tmp_path):
    raw = tiny_federated(num_clients=6, clients_per_round=6, rounds=1, min_clients=1, round_timeout=20.0)
    run = _run(tmp_path, raw, client_app=faulty)
    (record,) = run.read_metrics()
    reasons = {d["client"]: d["reason"] for d in record["dropped"]}
    assert record["clients"] == [5]
    assert "client error" in reasons[0]
    assert "non-finite" in reasons[1]
    assert "wrong shape" in reasons[2]
    assert "missing keys" in reasons[3]
    assert "no reply within federation.round_timeout" in reasons[4]
    assert (run.model / "unet").is_dir()


all_nan = ClientApp()
all_nan.query()(handle_query)


@all_nan.train()
def nan_from_round_two(msg: Message, context: Context) -> Message:
    reply = handle_train(msg, context)
    return _corrupt(reply, "nan") if int(msg.content["config"]["server-round"]) >= 2 else reply


def test_too_few_valid_replies_stops_with_checkpoint_intact(tmp_path):
    raw = tiny_federated(rounds=3, min_clients=2, max_retries=1)
    with pytest.raises(
        FederationError, match=r"round 2: fewer than federation\.min_clients = 2 valid replies after 2"
    ):
        _run(tmp_path, raw, client_app=all_nan)
    run = RunDir(tmp_path / "run")
    assert run.latest_checkpoint() == run.checkpoint_dir(1)
    UNet2DModel.from_pretrained(run.checkpoint_dir(1) / "unet")  # loads: not corrupt
    assert [r["round"] for r in run.read_metrics()] == [1]


def test_resume_matches_uninterrupted_with_strategy_state(tmp_path):
    raw = tiny_federated(num_clients=4, clients_per_round=2, rounds=3)
    raw["strategy"] = {"name": "fedyogi", "fedopt": {"eta": 0.01}}
    full = _run(tmp_path, raw, name="full")
    short = {**raw, "federation": {**raw["federation"], "rounds": 2}}
    part = _run(tmp_path, short, name="part")
    _run(tmp_path, raw, resume=True, name="part")
    a = UNet2DModel.from_pretrained(full.model, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(part.model, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (part.root / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["bytes_down"] > 0 and rows[-1]["bytes_up"] > 0


def test_udec_keeps_personal_groups_on_clients_and_evaluates_each(tmp_path):
    from fedsynth.config import load_config
    from fedsynth.core.rundir import read_json
    from fedsynth.exchange.groups import group_of
    from fedsynth.pipeline import run_all

    overrides = [
        "model.preset=tiny",
        "partition.scheme=iid",
        "partition.num_clients=3",
        "federation.clients_per_round=2",
        "federation.rounds=2",
        "federation.round_timeout=60.0",
        "train.local_steps=3",
        "train.batch_size=16",
        "diffusion.num_train_timesteps=50",
        "sample.per_class=2",
        "sample.steps=2",
        "eval.classifier_epochs=1",
        "eval.cas_epochs=1",
        "eval.tsne_points=0",
        'exchange.plan="udec"',
        'exchange.codec="int8"',
        'strategy.name="fedavgm"',
    ]
    cfg = load_config(Path(__file__).parents[1] / "configs" / "digits-federated.toml", overrides)
    run = run_all(cfg, tmp_path / "run")
    server = UNet2DModel.from_pretrained(run.model, subfolder="unet").state_dict()
    up = [k for k in server if group_of(k) == "up"]
    for record in run.read_metrics():  # only the up group travels after the initial broadcast
        assert record["params_up"] == len(record["clients"]) * sum(server[k].numel() for k in up)
    clients = run.client_runs()
    personal = [UNet2DModel.from_pretrained(c.model, subfolder="unet").state_dict() for c in clients]
    assert len(personal) == 3
    down = "conv_in.weight"
    for p in personal:
        assert all(torch.equal(p[k], server[k]) for k in up)  # shared part: the global model
        assert not torch.equal(p[down], server[down])  # personal part: trained locally, never sent
    assert not torch.equal(personal[0][down], personal[1][down])
    ev = read_json(run.eval)
    assert sorted(ev["per_client"]) == ["client-00", "client-01", "client-02"]
    means = [ev["per_client"][c]["cas_accuracy"] for c in ev["per_client"]]
    assert ev["cas_accuracy"] == pytest.approx(sum(means) / 3)
    assert "Personal models" in run.report.read_text()


def test_two_identical_runs_give_bit_identical_weights(tmp_path):
    """Replies arrive in any order; aggregation goes in client-id order, so it does not matter."""
    raw = tiny_federated(num_clients=4, clients_per_round=4, rounds=2)
    a, b = (_run(tmp_path, raw, name=name) for name in ("a", "b"))
    weights = "unet/diffusion_pytorch_model.safetensors"
    for r in (1, 2):
        assert (a.checkpoint_dir(r) / weights).read_bytes() == (b.checkpoint_dir(r) / weights).read_bytes()

"""FedDiff (Li & Ping): consolidation maths by hand, the networks' shapes, the T ∝ r schedule,
determinism, the strategy on toy weights, the config refusals and a tiny federated run."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedsynth.config import FedDiffConfig, config_from_dict
from fedsynth.core.errors import ConfigError
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.unet import build_unet
from fedsynth.evaluation.classifier import SmallCNN
from fedsynth.report.markdown import write_report
from fedsynth.strategies import build_strategy
from fedsynth.strategies.feddiff import (
    LatentDenoiser,
    WeightAE,
    consolidate,
    denoise_steps,
    kl_to_standard,
    pretrain_space,
    subset_keys,
)
from fedsynth.strategies.flower import ensure_run_identity
from test_federated import _run, tiny_federated

TINY = {"ae_steps": 30, "ldm_steps": 30, "timesteps": 10, "t_final": 6, "encoder_steps": 3}


def test_consolidation_is_the_mean_of_means_and_of_variances_eq8():
    mu = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    var = torch.tensor([[1.0, 1.0], [3.0, 5.0], [2.0, 0.0]])
    mu_s, var_s = consolidate(mu, var)
    assert mu_s.tolist() == [3.0, 3.0]
    assert var_s.tolist() == [2.0, 2.0]


def test_kl_to_the_standard_normal_by_hand():
    assert float(kl_to_standard(torch.zeros(3), torch.ones(3))) == 0.0
    # ½(σ² + μ² − 1 − log σ²) with μ = 1, σ² = 1 → 0.5; with μ = 0, σ² = e → ½(e − 2)
    assert float(kl_to_standard(torch.ones(2), torch.ones(2))) == pytest.approx(0.5)
    assert float(kl_to_standard(torch.zeros(1), torch.full((1,), np.e))) == pytest.approx((np.e - 2) / 2)


@pytest.mark.parametrize(
    ("round_", "rounds", "t_final", "expected"),
    [
        (1, 10, 200, 20),
        (5, 10, 200, 100),
        (10, 10, 200, 200),
        (1, 100, 20, 1),
        (50, 100, 20, 10),
        (99, 100, 20, 20),
    ],
)
def test_denoising_steps_grow_with_the_round_eq12(round_, rounds, t_final, expected):
    assert denoise_steps(round_, rounds, t_final) == expected


def test_autoencoder_and_denoiser_shapes():
    ae = WeightAE(250, latent=4)
    v = torch.randn(3, 250)
    z = ae.encode(v)
    assert z.shape == (3, 4, 16)  # 250 padded to 256, four halvings
    assert ae.decode(z).shape == (3, 250)
    assert LatentDenoiser(4)(z, torch.tensor(7)).shape == z.shape


def test_subset_defaults_to_the_last_normalisation_layer():
    cnn = SmallCNN(1, 10)
    keys = subset_keys(cnn, "")
    assert keys == ["features.7.weight", "features.7.bias"]
    assert sum(cnn.state_dict()[k].numel() for k in keys) == 256
    cfg = config_from_dict({"model": {"preset": "tiny"}})
    unet = build_unet(cfg.model, 16, 1, 10)
    assert subset_keys(unet, "") == ["conv_norm_out.weight", "conv_norm_out.bias"]
    assert subset_keys(cnn, "head") == ["head.weight", "head.bias"]
    with pytest.raises(ConfigError, match=r"feddiff.subset: 'nothing.here' matches no parameter"):
        subset_keys(cnn, "nothing.here")


def _pool(seed: int = 0, w: int = 24, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    vectors = 2.5 + torch.randn(w, d, generator=g)
    scores = -((vectors - 2.5) ** 2).sum(1)
    return vectors, scores


def test_pretraining_is_deterministic_for_a_seed():
    cfg = FedDiffConfig(**TINY)
    vectors, scores = _pool()
    a, _ = pretrain_space(["b"], vectors, scores, cfg, seed=3)
    b, _ = pretrain_space(["b"], vectors, scores, cfg, seed=3)
    c, _ = pretrain_space(["b"], vectors, scores, cfg, seed=4)
    for k, v in a.ae.state_dict().items():
        assert torch.equal(v, b.ae.state_dict()[k])
    assert not all(torch.equal(v, c.ldm.state_dict()[k]) for k, v in a.ldm.state_dict().items())
    assert torch.equal(a.scores, torch.sort(scores).values)  # the pool is ordered by score


def _reply(values: dict, n: int = 1) -> Message:
    metrics = {"num-examples": n, "num-steps": 5, "train-loss": 0.5, "partition-id": 0, "compute-s": 0.0}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def toy_feddiff(seed: int = 0):
    """FedDiff over FedAvg on weights {a (3), b (4)}, subset b, scored by −‖b − 2.5‖²."""
    ensure_run_identity()
    cfg = config_from_dict(
        {
            "seed": seed,
            "paradigm": "federated",
            "strategy": {"name": "feddiff"},
            "phoenix": {"beta": 4},
            "feddiff": TINY,
        }
    )
    s = build_strategy(cfg)
    vectors, scores = _pool()
    space, _ = pretrain_space(["b"], vectors, scores, cfg.feddiff, cfg.seed)
    s.attach(space, lambda w: -float(((w["b"] - 2.5) ** 2).sum()))
    return s


def test_strategy_averages_the_rest_and_keeps_the_best_generated_subset():
    s = toy_feddiff()
    clients = [
        {"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 3.0, 3.0]},
        {"a": [3.0, 0.0, 1.0], "b": [3.0, 3.0, 2.0, 2.0]},
    ]
    s.begin_round(ArrayRecord({"a": torch.zeros(3), "b": torch.zeros(4)}))
    arrays, _ = s.aggregate_train(1, [_reply(c, n) for c, n in zip(clients, [1, 3], strict=True)])
    out = arrays.to_torch_state_dict()
    assert torch.allclose(out["a"], torch.tensor([2.5, 0.5, 1.5]))  # FedAvg by examples
    info = s.round_metrics()["feddiff"]
    assert info["t"] == 1  # ⌈6 · 1 / 30⌉ (federation.rounds = 30 by default)
    assert info["score"] == pytest.approx(-float(((out["b"] - 2.5) ** 2).sum()))
    assert info["base_score"] == pytest.approx(
        -float(((torch.tensor([2.75, 2.75, 2.25, 2.25]) - 2.5) ** 2).sum())
    )
    assert not torch.equal(out["b"], torch.tensor([2.75, 2.75, 2.25, 2.25]))  # generated, not averaged


def test_strategy_state_round_trips_bit_identically():
    clients = [
        {"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 3.0, 3.0]},
        {"a": [3.0, 0.0, 1.0], "b": [3.0, 3.0, 2.0, 2.0]},
    ]
    start = ArrayRecord({"a": torch.zeros(3), "b": torch.zeros(4)})
    a = toy_feddiff()
    a.begin_round(start)
    a.aggregate_train(1, [_reply(c) for c in clients])  # round 1 fine-tunes a's encoder
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = toy_feddiff(seed=0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    outs = []
    for s in (a, b):
        s.begin_round(start)
        arrays, _ = s.aggregate_train(2, [_reply(c) for c in clients])
        outs.append(arrays.to_torch_state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    with pytest.raises(ValueError, match="state keys"):
        b.load_state_dict({"bogus": None})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "needs a proxy set"),
        ({"phoenix": {"beta": 4}, "exchange": {"plan": "usplit"}}, "exchange.plan = 'full'"),
        ({"phoenix": {"beta": 4}, "feddiff": {"t_final": 300}}, "exceeds feddiff.timesteps"),
        ({"phoenix": {"beta": 4}, "feddiff": {"pool_every": 500}}, "exceeds feddiff.pool_steps"),
        ({"phoenix": {"beta": 4}, "feddiff": {"base": "feddiff"}}, "feddiff.base"),
        ({"phoenix": {"beta": 4}, "feddiff": {"base": "scaffold"}}, "feddiff.base"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"paradigm": "federated", "strategy": {"name": "feddiff"}, **overrides})


@pytest.mark.slow
def test_federated_classifier_with_feddiff_records_the_pool_and_resumes_bit_identically(tmp_path):
    raw = {**tiny_federated(num_clients=4, clients_per_round=2, rounds=2), "task": "classifier"}
    raw |= {"strategy": {"name": "feddiff"}, "phoenix": {"beta": 20, "alpha": 0}}
    raw["feddiff"] = {**TINY, "pool_runs": 2, "pool_steps": 4, "pool_every": 2}
    full = _run(tmp_path, raw, name="full")
    # interrupted after round 1 with the same config (t_r depends on federation.rounds)
    shutil.copytree(full.root, tmp_path / "part")
    shutil.rmtree(RunDir(tmp_path / "part").checkpoint_dir(2))
    part = _run(tmp_path, raw, resume=True, name="part")
    a = SmallCNN.from_pretrained(full.model, subfolder="unet").state_dict()
    b = SmallCNN.from_pretrained(part.model, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = RunDir(full.root).read_metrics()
    assert [m["feddiff"]["t"] for m in lines] == [denoise_steps(r, 2, TINY["t_final"]) for r in (1, 2)]
    resumed = part.read_metrics()
    assert [m["test_accuracy"] for m in lines] == [m["test_accuracy"] for m in resumed]
    assert [m["feddiff"]["score"] for m in lines] == [m["feddiff"]["score"] for m in resumed]
    summary = json.loads(full.summary.read_text())["feddiff"]
    assert summary["pool_size"] == 4 and summary["subset_params"] == 256
    assert summary["subset"] == ["features.7.weight", "features.7.bias"]
    full.write_config(config_from_dict(raw))
    report = write_report(full)
    assert "## FedDiff" in report and "256 parameters" in report and (full.root / "feddiff.png").is_file()

"""Paradigm ``local``: one-shot mixture of local models."""

import json
import time

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from conftest import TINY_OVERRIDES
from fedsynth.client.app import handle_query, handle_train
from fedsynth.config import ConfigError, config_from_dict, load_config
from fedsynth.pipeline import run_all
from fedsynth.server.oneshot import mixture_counts
from test_cli import CENTRAL


def test_mixture_counts_split_each_class_over_its_holders_by_hand():
    hist = np.array([[10, 0, 5, 1], [30, 0, 5, 1], [0, 0, 0, 1]])
    counts = mixture_counts(hist, per_class=8)
    assert counts[:, 0].tolist() == [2, 6, 0]  # 8·10/40 and 8·30/40: a class held by two is drawn from both
    assert counts[:, 1].tolist() == [0, 0, 0]  # nobody holds it
    assert counts[:, 2].tolist() == [4, 4, 0]
    assert counts[:, 3].tolist() == [3, 3, 2]  # 8/3 each: floors 2, 2, 2; the two largest remainders tie
    assert (counts.sum(axis=0)[[0, 2, 3]] == 8).all()


def test_local_refuses_what_it_does_not_do():
    with pytest.raises(ConfigError, match=r"exchange.plan = 'udec' is not available with paradigm = 'local'"):
        config_from_dict({"paradigm": "local", "exchange": {"plan": "udec"}})


@pytest.mark.slow
def test_tiny_local_run_trains_each_client_once_and_draws_classes_from_their_holders(tmp_path):
    overrides = [*TINY_OVERRIDES, 'paradigm="local"', 'partition.scheme="class_disjoint"', "local.steps=4"]
    out = run_all(load_config(CENTRAL, overrides), tmp_path / "run")
    (record,) = out.read_metrics()
    assert record["round"] == 1 and record["clients"] == [0, 1] and record["steps_per_client"] == 4
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0
    assert [c.root.name for c in out.client_runs()] == ["client-00", "client-01"]
    manifest = json.loads((out.synthetic / "manifest.json").read_text())
    held = {int(p): np.flatnonzero(h).tolist() for p, h in record["class_counts_per_client"].items()}
    for pid, row in manifest["mixture"].items():
        assert [c for c, n in enumerate(row) if n] == held[int(pid)]  # only classes the client holds
    assert manifest["counts"] == dict.fromkeys(manifest["class_names"], 3)
    summary = json.loads(out.summary.read_text())
    assert summary["paradigm"] == "local" and summary["strategy"] == "none" and "cas_accuracy" in summary
    # the models behind the synthetic set are audited, each on its own members; the worst is the run's
    audit = json.loads(out.eval.read_text())["membership"]
    assert sorted(audit["mia_per_client"]) == ["0", "1"] and summary["mia_model"].startswith("each client's")
    assert summary["mia_auc"] == max(a["mia_auc"] for a in audit["mia_per_client"].values())
    report = (out.root / "report.md").read_text()
    assert "## Local models (one per client; the synthetic set is their mixture)" in report
    assert "Personal models" not in report


@pytest.mark.slow
def test_uploading_samples_gives_the_same_synthetic_set_as_uploading_models(tmp_path):
    overrides = [*TINY_OVERRIDES, 'paradigm="local"', 'partition.scheme="class_disjoint"', "local.steps=3"]
    overrides += ["eval.enabled=false"]
    by_model = run_all(load_config(CENTRAL, overrides), tmp_path / "model")
    by_samples = run_all(load_config(CENTRAL, [*overrides, 'local.upload="samples"']), tmp_path / "samples")
    pngs = sorted(p.relative_to(by_model.synthetic) for p in by_model.synthetic.rglob("*.png"))
    assert pngs == sorted(p.relative_to(by_samples.synthetic) for p in by_samples.synthetic.rglob("*.png"))
    for p in pngs:
        assert (by_model.synthetic / p).read_bytes() == (by_samples.synthetic / p).read_bytes()
    assert not by_samples.client_runs()  # the models never left the clients
    up = {r.root.name: r.read_metrics()[0]["bytes_up"] for r in (by_model, by_samples)}
    assert up["samples"] < up["model"] / 10  # 30 tiny images vs two models


def test_samples_upload_needs_images_to_send():
    with pytest.raises(ConfigError, match=r"local.upload = 'samples' needs sample.per_class > 0"):
        config_from_dict({"paradigm": "local", "local": {"upload": "samples"}, "sample": {"per_class": 0}})


slow = ClientApp()
slow.query()(handle_query)


@slow.train()
def slow_train(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1:
        time.sleep(6)  # past rounds × round_timeout (4 s); the run waits for it at its end
    return handle_train(msg, context)


@pytest.mark.slow
def test_a_client_that_never_answers_the_one_shot_is_dropped_and_the_rest_kept(tmp_path):
    overrides = [*TINY_OVERRIDES, 'paradigm="local"', 'partition.scheme="class_disjoint"', "local.steps=2"]
    overrides += ["federation.round_timeout=2", "sample.per_class=0", "eval.enabled=false"]
    out = run_all(load_config(CENTRAL, overrides), tmp_path / "run", client_app=slow)
    (record,) = out.read_metrics()
    assert record["clients"] == [0]
    assert record["dropped"] == [{"client": 1, "reason": "no local model"}]
    assert [c.root.name for c in out.client_runs()] == ["client-00"]


def test_finetuning_needs_a_federated_run_without_personal_modules():
    with pytest.raises(ConfigError, match=r"federation.finetune_steps needs paradigm = 'federated'"):
        config_from_dict({"paradigm": "centralized", "federation": {"finetune_steps": 5}})
    with pytest.raises(ConfigError, match=r"exchange.personal = 'last-block'"):
        config_from_dict(
            {
                "paradigm": "federated",
                "federation": {"finetune_steps": 5},
                "exchange": {"personal": "last-block"},
            }
        )
    with pytest.raises(ConfigError, match=r"finetune_steps is not available with privacy.mode = 'dp-fedavg'"):
        private = {"mode": "dp-fedavg", "noise_multiplier": 1.0}
        config_from_dict({"paradigm": "federated", "federation": {"finetune_steps": 5}, "privacy": private})


@pytest.mark.slow
def test_federated_run_with_finetuning_samples_the_clients_finetuned_mixture(tmp_path):
    overrides = [*TINY_OVERRIDES, 'partition.scheme="class_disjoint"', "federation.finetune_steps=3"]
    out = run_all(load_config(CENTRAL, [*overrides, 'paradigm="federated"']), tmp_path / "run")
    *rounds, last = out.read_metrics()
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)) and "phase" not in rounds[-1]
    assert last["phase"] == "finetune" and last["round"] == len(rounds) + 1 and last["steps_per_client"] == 3
    assert (out.model / "unet").is_dir()  # the global model is kept beside the clients' fine-tuned ones
    assert [c.root.name for c in out.client_runs()] == ["client-00", "client-01"]
    manifest = json.loads((out.synthetic / "manifest.json").read_text())
    held = {int(p): np.flatnonzero(h).tolist() for p, h in last["class_counts_per_client"].items()}
    for pid, row in manifest["mixture"].items():
        assert [c for c, n in enumerate(row) if n] == held[int(pid)]
    summary = json.loads(out.summary.read_text())
    assert summary["rounds"] == len(rounds) and summary["finetune_steps"] == 3
    assert summary["mia_model"].startswith("each client's model")  # the fine-tuned ones, not the global
    report = (out.root / "report.md").read_text()
    assert "## Local models (one per client; the synthetic set is their mixture)" in report
    assert "uploaded its fine-tuned model" in report


def test_one_off_local_model_can_be_the_ema_of_its_steps():
    """local.ema_decay = d: the uploaded weights are EMA_2 = d·w_1 + (1 − d)·w_2 after two steps
    (the first step copied, then the constant decay), not the last iterate w_2."""
    import torch

    from fedsynth.client.local import local_train
    from fedsynth.data.datasets import ImageData
    from fedsynth.diffusion.unet import build_unet

    cfg = config_from_dict({"model": {"preset": "tiny"}, "diffusion": {"num_train_timesteps": 50},
                            "train": {"batch_size": 4}})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randn(8, 1, 16, 16, generator=g), torch.arange(8) % 2, ("a", "b"))
    start = {k: v.clone() for k, v in build_unet(cfg.model, 16, 1, 2).state_dict().items()}

    def weights(steps: int, decay: float) -> dict:
        return local_train(
            cfg, data, start, round_=0, client_id=0, state={}, steps=steps, ema_decay=decay
        ).weights

    w1, w2, ema = weights(1, 0.0), weights(2, 0.0), weights(2, 0.25)
    key = "conv_in.weight"
    assert not torch.equal(w1[key], w2[key])
    assert torch.allclose(ema[key], 0.25 * w1[key] + 0.75 * w2[key], atol=1e-6)

"""Task ``classifier``: the federation trains the domain-classifier CNN on the clients' data."""

import json

import pytest
import torch

from conftest import TINY_OVERRIDES
from fedsynth.config import ConfigError, config_from_dict, load_config
from fedsynth.core.rundir import RunDir
from fedsynth.evaluation.classifier import SmallCNN
from fedsynth.pipeline import accuracy_summary, run_all
from fedsynth.stages.checkpoint import load_model
from fedsynth.training.tasks import classifier_loss, heldout_accuracy, seeded_model
from test_cli import CENTRAL
from test_federated import _run, tiny_federated


def test_accuracy_summary_by_hand():
    metrics = [{"round": 1, "test_accuracy": 0.5}, {"round": 2, "test_accuracy": 0.9}]
    metrics += [{"round": 3, "test_accuracy": 0.96}, {"round": 4, "test_accuracy": 0.94}]
    # best 0.96; 95% of it is 0.912: round 2 (0.90) falls short, round 3 is the first to reach it
    assert accuracy_summary(metrics) == {
        "test_accuracy": 0.94,
        "best_test_accuracy": 0.96,
        "rounds_to_95pct_best": 3,
    }
    assert accuracy_summary([{"round": 1, "train_loss": 1.0}]) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"task": "classifier"}, "task = 'classifier' runs in the federated paradigm, not 'centralized'"),
        (
            {"task": "classifier", "paradigm": "federated", "exchange": {"plan": "udec"}},
            "exchange.plan = 'udec' is not available with task = 'classifier'",
        ),
        (
            {"task": "classifier", "paradigm": "federated", "model": {"init": "runs/x"}},
            "model.init = 'runs/x' is not available with task = 'classifier'",
        ),
        (
            {
                "task": "classifier",
                "paradigm": "federated",
                "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0},
            },
            "privacy.mode = 'dp-sgd' is not available with task = 'classifier'",
        ),
        ({"task": "regressor"}, "task"),
    ],
)
def test_classifier_task_refuses_what_only_a_denoiser_has(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_seeded_classifier_is_the_domain_cnn_and_its_loss_is_cross_entropy():
    cfg = config_from_dict({"task": "classifier", "paradigm": "federated"})
    a, b = seeded_model(cfg, 3, 16, 1, 10), seeded_model(cfg, 3, 16, 1, 10)
    assert isinstance(a, SmallCNN) and all(
        torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )
    a.eval()  # no dropout: the loss is the plain cross-entropy of the (shifted) batch
    images, labels = torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(0)
    expected = torch.nn.functional.cross_entropy(a(images), labels)  # all-zero images: shifts change nothing
    assert torch.allclose(classifier_loss(a, images, labels, gen), expected)


def test_test_accuracy_counts_correct_argmax_and_keeps_the_mode():
    model = SmallCNN(1, 2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))  # always predicts class 0
    model.train()
    from fedsynth.data.datasets import ImageData

    test = ImageData(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 0, 1]), ("a", "b"))
    assert heldout_accuracy(model, test) == 0.75 and model.training


@pytest.mark.slow
def test_federated_classifier_reports_test_accuracy_every_round_and_saves_the_cnn(tmp_path):
    overrides = [*TINY_OVERRIDES, 'paradigm="federated"', 'task="classifier"', "federation.rounds=3"]
    out = run_all(load_config(CENTRAL, overrides), tmp_path / "run")
    metrics = out.read_metrics()
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert all(0.0 <= m["test_accuracy"] <= 1.0 for m in metrics)
    summary = json.loads(out.summary.read_text())
    assert summary["task"] == "classifier" and summary["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(m["test_accuracy"] for m in metrics)
    assert "fd" not in summary and not out.synthetic.exists()  # nothing is sampled or judged
    saved = SmallCNN.from_pretrained(out.model, subfolder="unet", low_cpu_mem_usage=False)
    assert saved.config.num_classes == 10
    with pytest.raises(Exception, match="holds a classifier"):
        load_model(out, torch.device("cpu"))
    report = (out.root / "report.md").read_text()
    assert "![accuracy](accuracy.png)" in report and (out.root / "accuracy.png").is_file()


@pytest.mark.slow
def test_classifier_resume_matches_uninterrupted(tmp_path):
    raw = {**tiny_federated(num_clients=4, clients_per_round=2, rounds=2), "task": "classifier"}
    raw["strategy"] = {"name": "fedavgm"}
    full = _run(tmp_path, raw, name="full")
    _run(tmp_path, {**raw, "federation": {**raw["federation"], "rounds": 1}}, name="part")
    part = _run(tmp_path, raw, resume=True, name="part")
    a = SmallCNN.from_pretrained(full.model, subfolder="unet").state_dict()
    b = SmallCNN.from_pretrained(part.model, subfolder="unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["test_accuracy"] for m in RunDir(full.root).read_metrics()] == [
        m["test_accuracy"] for m in part.read_metrics()
    ]


def test_compare_sets_a_federated_classifier_beside_the_cas_of_a_generative_run():
    from pathlib import Path

    from fedsynth.report.compare import comparison_table, run_label

    generative = {"paradigm": "federated", "strategy": "fedavgm", "cas_accuracy": 0.9, "fd": 1.0}
    classifier = {"paradigm": "federated", "strategy": "fedavgm", "task": "classifier", "test_accuracy": 0.25}
    rows = {run_label(s, Path(name)): s for name, s in (("gen", generative), ("cls", classifier))}
    table = comparison_table(rows).splitlines()
    assert table[0].startswith("| run | classifier on real test ↑ |")
    assert table[2].startswith("| gen (fedavgm) | 90.00% |")
    assert table[3].startswith("| cls (fedavgm, federated classifier) | 25.00% | – |")

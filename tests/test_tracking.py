"""Experiment tracking: what TensorBoard's and MLflow's own readers see of a run."""

import json

import pytest

from conftest import TINY_OVERRIDES
from fedsynth.config import load_config
from fedsynth.core.errors import ConfigError
from fedsynth.pipeline import run_all
from fedsynth.stages.tracking import numbers

CENTRAL = [*TINY_OVERRIDES, "paradigm=centralized", "eval.enabled=false", "sample.grid_per_class=2"]


def test_numbers_flattens_maps_and_drops_what_is_not_a_finite_number():
    record = {
        "round": 3,
        "train_loss": 0.25,
        "ok": True,
        "clients": [0, 1],
        "client_compute_s": {"0": 1.5, "1": 2},
        "epsilon": float("nan"),
        "nested": {"a": {"b": 4}},
        "name": "fedavg",
    }
    assert numbers(record) == {
        "round": 3.0,
        "train_loss": 0.25,
        "client_compute_s/0": 1.5,
        "client_compute_s/1": 2.0,
        "nested/a/b": 4.0,
    }


@pytest.mark.slow
def test_tensorboard_sees_every_round_a_grid_per_checkpoint_and_the_final_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("configs/digits-centralized.toml", [*CENTRAL, "track=tensorboard"])
    run = run_all(cfg, tmp_path / "run")
    events = EventAccumulator(str(run.root / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    lines = run.read_metrics()
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [line["round"] for line in lines] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([line["train_loss"] for line in lines])
    assert [e.step for e in events.Images("samples")] == [1, 2]  # checkpoint_every = 1
    assert events.Images("samples/final")[0].width > 0
    summary = json.loads(run.summary.read_text())
    assert events.Scalars("final/train_wall_s")[0].value == pytest.approx(summary["train_wall_s"])
    assert "seed" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_mlflow_logs_params_metrics_grids_and_the_report_and_resumes_the_same_run(tmp_path):
    from mlflow import MlflowClient

    sets = [*CENTRAL, "track=mlflow", "federation.rounds=1"]
    run = run_all(load_config("configs/digits-centralized.toml", sets), tmp_path / "run")
    resumed = load_config(run.config, ["federation.rounds=2"])
    run_all(resumed, tmp_path / "run", resume=True)
    saved = json.loads((run.root / "mlflow.json").read_text())
    assert saved["tracking_uri"] == (run.root / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    found = client.search_runs([client.get_experiment_by_name("fedsynth").experiment_id])
    assert [r.info.run_id for r in found] == [saved["run_id"]]  # one MLflow run for both
    logged = found[0]
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["train.lr"] == str(resumed.train.lr)
    history = client.get_metric_history(saved["run_id"], "train_loss")
    lines = run.read_metrics()
    assert sorted(m.step for m in history) == [1, 2]
    assert sorted(m.value for m in history) == pytest.approx(sorted(line["train_loss"] for line in lines))
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
    assert {"report.md", "samples.png", "summary.json", "samples"} <= artifacts
    grids = {a.path for a in client.list_artifacts(saved["run_id"], "samples")}
    assert grids == {"samples/round-00001", "samples/round-00002"}


def test_an_unknown_tracker_is_one_line():
    with pytest.raises(ConfigError, match="track"):
        load_config("configs/digits-centralized.toml", ["track=wandb"])

"""Experiment tracking: the run's metrics, as they are written, also in TensorBoard or MLflow.

``track = "tensorboard"`` writes event files to ``RUN/tb`` (``torch.utils.tensorboard``);
``track = "mlflow"`` logs to an MLflow tracking store (``mlflow.tracking_uri``; default a file
store at ``RUN/mlruns``), resuming the same MLflow run when the fedsynth run is resumed. Both get:

- every round's numbers (``metrics.jsonl``: loss, bytes, wall time, ε when DP is on, and maps
  such as per-client compute as ``client_compute_s/<client>``), step = the round;
- a sample grid of the current weights at every checkpoint (diffusion runs);
- the final summary (``summary.json``'s numbers), the final ``samples.png`` and, for MLflow, the
  config as parameters and ``report.md`` as an artifact.

The pipeline opens one tracker per run (:func:`tracking`); the round loop and the pipeline
report to :func:`active`, which is a no-op tracker when tracking is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedsynth.config import Config, ConfigError, flat_items
from fedsynth.core.rundir import RunDir, read_json, write_json_atomic
from fedsynth.stages.synthesize import SampleSpec, sample_images, write_grid

MLFLOW_RUN = "mlflow.json"  # RUN/mlflow.json: the MLflow run this fedsynth run logs to


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, nested maps flattened as ``key/sub``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numbers(value, f"{name}/"))
    return out


class Tracker:
    """No tracking: the interface, every method a no-op."""

    wants_images = False

    def round(self, record: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``."""

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG written by the run (a sample grid)."""

    def final(self, run: RunDir) -> None:
        """The finished run: summary, final grid, report."""

    def close(self, ok: bool = True) -> None:
        """Flush and release the backend (``ok``: the run finished or stopped cleanly)."""


class TensorBoardTracker(Tracker):
    wants_images = True

    def __init__(self, cfg: Config, run: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.root / "tb"))
        self.writer.add_text("config", f"```toml\n{run.config.read_text()}\n```", 0)

    def round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in numbers(record).items():
            if key != "round":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def final(self, run: RunDir) -> None:
        summary = read_json(run.summary)
        rounds = int(summary.get("rounds", 0))
        for key, value in numbers(summary).items():
            self.writer.add_scalar(f"final/{key}", value, rounds)
        if (run.root / "samples.png").is_file():
            self.image("samples/final", run.root / "samples.png", rounds)

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    wants_images = True

    def __init__(self, cfg: Config, run: RunDir) -> None:
        import mlflow

        uri = cfg.mlflow.tracking_uri or (run.root / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = self._run_id(cfg, run)
        self.run = run

    def _run_id(self, cfg: Config, run: RunDir) -> str:
        saved = run.root / MLFLOW_RUN
        if saved.is_file():  # a resumed run keeps logging to its MLflow run (in the same store)
            known = read_json(saved)
            if known.get("tracking_uri") == self.client.tracking_uri:
                return str(known["run_id"])
        experiment = self.client.get_experiment_by_name(cfg.mlflow.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.mlflow.experiment)
        )
        created = self.client.create_run(experiment_id, run_name=run.root.name)
        params = {k: str(v)[:6000] for k, v in flat_items(cfg).items()}
        for chunk in _chunks(list(params.items()), 100):
            self.client.log_batch(created.info.run_id, params=[_param(k, v) for k, v in chunk])
        write_json_atomic(saved, {"tracking_uri": self.client.tracking_uri, "run_id": created.info.run_id})
        return created.info.run_id

    def round(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(record["round"]), _millis()
        found = [Metric(_key(k), v, stamp, step) for k, v in numbers(record).items() if k != "round"]
        for chunk in _chunks(found, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"{tag}/round-{step:05d}")

    def final(self, run: RunDir) -> None:
        from mlflow.entities import Metric

        summary = read_json(run.summary)
        found = [Metric(_key(f"final/{k}"), v, _millis(), 0) for k, v in numbers(summary).items()]
        self.client.log_batch(self.run_id, metrics=found)
        for name in ("report.md", "samples.png", "summary.json"):
            if (run.root / name).is_file():
                self.client.log_artifact(self.run_id, str(run.root / name))

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _key(name: str) -> str:
    """An MLflow metric name (letters, digits, ``_-./ ``)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


BACKENDS: dict[str, type[Tracker]] = {
    "none": Tracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}
_ACTIVE: list[Tracker] = [Tracker()]


def record_round(run: RunDir, line: dict[str, Any]) -> None:
    """A round's metrics line: appended to ``metrics.jsonl``, then to the active tracker."""
    run.append_metrics(line)
    active().round(line)


def active() -> Tracker:
    """The tracker of the run in progress in this process (a no-op one when none is)."""
    return _ACTIVE[-1]


@contextlib.contextmanager
def tracking(cfg: Config, run: RunDir) -> Iterator[Tracker]:
    """Open ``cfg.track``'s tracker for ``run`` (the active one until the block ends)."""
    try:
        tracker = Tracker() if cfg.track == "none" else BACKENDS[cfg.track](cfg, run)
    except ImportError as exc:
        raise ConfigError(
            f'track = "{cfg.track}" needs {exc.name}: pip install "fedsynth[track]" (make install does)'
        ) from None
    _ACTIVE.append(tracker)
    ok = False
    try:
        yield tracker
        ok = True
    finally:
        _ACTIVE.remove(tracker)
        tracker.close(ok)


def checkpoint_grid(cfg: Config, run: RunDir, model, scheduler, round_: int) -> None:
    """A small sample grid of ``model``'s current weights to the active tracker (when it takes
    images; diffusion runs): ``min(sample.grid_per_class, 4)`` per class with the run's sampler.
    Its own seeded generator: training's random stream is untouched."""
    tracker = active()
    if not tracker.wants_images or cfg.task != "diffusion":
        return
    names = list(read_json(run.partitions)["class_names"])
    spec = dataclasses.replace(SampleSpec.of(cfg), per_class=min(cfg.sample.grid_per_class, 4))
    training = model.training
    try:
        images, labels = sample_images(model, scheduler, len(names), spec)
    finally:
        model.train(training)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.png"
        write_grid(images, labels, names, path, per_row=spec.per_class, title=f"round {round_}")
        tracker.image("samples", path, round_)

"""``fedsynth run``: every stage in order, each reading and writing the run directory.

prepare (partitions) → train (per paradigm) → sample → evaluate → report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

from fedsynth.config import Config, check_resume_changes, is_pipeline_folder, load_config
from fedsynth.core.errors import ConfigError
from fedsynth.core.rundir import RunDir, check_fresh
from fedsynth.diffusion.latent import check_pipeline
from fedsynth.diffusion.schedule import check_base_schedule
from fedsynth.diffusion.training import resolve_device
from fedsynth.evaluation.evaluate import evaluate_run
from fedsynth.evaluation.inception import check_weights_file
from fedsynth.exchange.transfer import has_personal_models
from fedsynth.paradigms.centralized import steps_per_round, train_centralized
from fedsynth.paradigms.federated import train_federated
from fedsynth.paradigms.local_models import sample_mixture, train_local
from fedsynth.privacy.accounting import default_delta, resolve_noise
from fedsynth.report.markdown import write_report
from fedsynth.stages.checkpoint import load_model
from fedsynth.stages.prepare import Prepared, check_partitions, prepare
from fedsynth.stages.synthesize import SampleSpec, synthesize
from fedsynth.stages.synthetic_set import check_fits
from fedsynth.stages.tracking import tracking


def sample_run(
    cfg: Config, run: RunDir, unet: UNet2DModel, scheduler: DDPMScheduler, class_names: list[str]
) -> dict:
    """Write ``synthetic/`` (replacing an old one) and ``samples.png``."""
    shutil.rmtree(run.synthetic, ignore_errors=True)
    spec = SampleSpec.of(cfg)
    if spec.per_class == 0:
        return {}
    rounds = [r["round"] for r in run.read_metrics()]
    manifest = synthesize(
        unet,
        scheduler,
        class_names,
        spec,
        run.synthetic,
        model_round=max(rounds) if rounds else None,
        grid=run.root / "samples.png",
        grid_per_row=cfg.sample.grid_per_class,
        grid_title=f"{cfg.paradigm} · {spec.sampler}-{spec.steps}",
    )
    return manifest


def check_base_model(cfg: Config) -> None:
    """A pipeline folder in ``model.init`` is complete and its noise schedule is the run's,
    before anything is written."""
    if is_pipeline_folder(cfg.model.init):
        folder = Path(cfg.model.init)
        check_pipeline(folder)
        schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        check_base_schedule(cfg.diffusion, schedule, f"model.init = {str(folder)!r}")


def check_eval_sizes(cfg: Config, prepared: Prepared, k: int = 3) -> None:
    """Evaluation's k-NN precision/recall need more than k real test and k generated images."""
    if not (cfg.eval.enabled and cfg.sample.per_class > 0) or cfg.task == "classifier":
        return
    generated = cfg.sample.per_class * prepared.data.full.num_classes
    tested = len(prepared.data.test_indices)
    if min(generated, tested) <= k:
        raise ConfigError(
            f"evaluation needs more than {k} generated and {k} held-out test images; this run would "
            f"have {generated} (sample.per_class) and {tested} (data.test_fraction): raise them, or set "
            "eval.enabled = false"
        )


def train(cfg: Config, run: RunDir, prepared, *, resume: bool, grid=None, client_app=None) -> None:
    if cfg.paradigm == "centralized":
        train_centralized(cfg, run, prepared, resume=resume)
    elif cfg.paradigm == "federated":
        train_federated(cfg, run, prepared, resume=resume, grid=grid, client_app=client_app)
    elif cfg.paradigm == "decentralized":
        from fedsynth.paradigms.decentralized import train_decentralized  # web3 and the chain: only when used

        train_decentralized(cfg, run, prepared, resume=resume)
    elif cfg.paradigm == "local":
        if not (resume and run.read_metrics()):  # a one-shot run that finished has nothing to resume
            train_local(cfg, run, prepared, grid=grid, client_app=client_app)
    else:
        raise ConfigError(f"paradigm = {cfg.paradigm!r} is not valid")


def sample_stage(cfg: Config, run: RunDir, names: list[str], personal: bool) -> None:
    """``synthetic/``: from the model; from each client's own model (personal models); or
    drawn from the clients' models per class (paradigm ``local``, ``federation.finetune_steps``)."""
    if cfg.paradigm == "local" or cfg.federation.finetune_steps:
        if cfg.sample.per_class > 0 and cfg.local.upload == "model":
            sample_mixture(cfg, run, names)
        return
    for target in run.client_runs() if personal else [run]:
        unet, scheduler = load_model(target, resolve_device(cfg.train.device))
        sample_run(cfg, target, unet, scheduler, names)


def privacy_sizes(cfg: Config, prepared: Prepared) -> list[int]:
    """The data size N of every party that trains with DP-SGD."""
    if cfg.paradigm == "centralized":
        return [sum(len(c) for c in prepared.clients) + len(prepared.shared)]
    return [len(prepared.client_indices(k)) for k in range(len(prepared.clients))]


def privacy_summary(cfg: Config, prepared: Prepared, metrics: list[dict]) -> dict:
    """The run's (ε, δ): the largest ε any party spent, with the largest δ among the parties."""
    p = cfg.privacy
    n = cfg.partition.num_clients if p.mode == "dp-fedavg" else min(privacy_sizes(cfg, prepared))
    return {
        "privacy": p.mode,
        "epsilon": metrics[-1].get("epsilon_max", 0.0) if metrics else 0.0,
        "delta": default_delta(p, n),
        "noise_multiplier": p.noise_multiplier,
        "accountant": p.accountant,
    }


def accuracy_summary(metrics: list[dict], share: float = 0.95) -> dict:
    """Task ``classifier``: the last and best test accuracy and the first round reaching
    ``share`` of the best (FedDiff's Table 1 measures)."""
    acc = [m["test_accuracy"] for m in metrics if "test_accuracy" in m]
    if not acc:
        return {}
    best = max(acc)
    first = next(m["round"] for m in metrics if m.get("test_accuracy", -1.0) >= share * best)
    return {"test_accuracy": acc[-1], "best_test_accuracy": best, "rounds_to_95pct_best": first}


def run_all(cfg: Config, out: Path, *, resume: bool = False, grid=None, client_app=None) -> RunDir:
    """Every stage into ``out``. ``grid``: a real SuperLink's Grid (else a simulation);
    ``client_app``: the simulated clients' ClientApp (default: fedsynth's)."""
    if cfg.eval.enabled and cfg.eval.inception_weights:
        check_weights_file(cfg.eval.inception_weights)  # before hours of training, not after
    if not resume:
        check_fresh(Path(out))
    check_base_model(cfg)
    with RunDir(Path(out)).writer_lock():
        return _run_all(cfg, Path(out), resume=resume, grid=grid, client_app=client_app)


def _run_all(cfg: Config, out: Path, *, resume: bool, grid, client_app) -> RunDir:
    run = RunDir(out).create()
    if not resume and run.metrics.exists():
        run.truncate_metrics(0)  # a run that stopped before its first checkpoint starts again
    start = time.perf_counter()
    if resume:
        if check_resume_changes(load_config(run.config), cfg):
            run.write_config(cfg)  # the changed settings are recorded
        prepared = prepare(cfg)
        check_partitions(run, prepared)
    else:
        prepared = prepare(cfg, run)
        cfg = resolve_noise(cfg, privacy_sizes(cfg, prepared), steps_per_round(cfg, prepared))
        run.write_config(cfg)
    check_eval_sizes(cfg, prepared)  # before hours of training, not after
    full = prepared.data.full
    check_fits(
        cfg.sample.per_class * full.num_classes, tuple(full.shape), run.synthetic, loaded=cfg.eval.enabled
    )
    with tracking(cfg, run) as tracker:
        _stages(cfg, run, prepared, start, resume=resume, grid=grid, client_app=client_app)
        tracker.final(run)
    return run


def _stages(cfg: Config, run: RunDir, prepared, start: float, *, resume: bool, grid, client_app) -> None:
    """Train, then sample, evaluate and report (the summary grows at each stage)."""
    train(cfg, run, prepared, resume=resume, grid=grid, client_app=client_app)
    metrics = run.read_metrics()
    run.update_summary(
        paradigm=cfg.paradigm,
        task=cfg.task,
        strategy=cfg.strategy.name if cfg.paradigm in ("federated", "decentralized") else "none",
        rounds=sum(1 for r in metrics if r.get("phase") != "finetune"),
        train_wall_s=sum(r["wall_s"] for r in metrics),
        bytes_up=sum(r.get("bytes_up", 0) for r in metrics),
        bytes_down=sum(r.get("bytes_down", 0) for r in metrics),
    )
    if cfg.privacy.mode != "none":
        run.update_summary(**privacy_summary(cfg, prepared, metrics))
    personal = has_personal_models(cfg.exchange) and cfg.paradigm == "federated"
    if cfg.task == "classifier":  # the trained model is the product: no sampling, no evaluation
        run.update_summary(**accuracy_summary(metrics))
    else:
        sample_stage(cfg, run, list(prepared.data.full.class_names), personal)
    if cfg.eval.enabled and cfg.sample.per_class > 0 and cfg.task == "diffusion":
        evaluate_run(cfg, run)
    for client in run.client_runs() if personal else []:
        write_report(client)
    run.update_summary(wall_s=time.perf_counter() - start)
    write_report(run)

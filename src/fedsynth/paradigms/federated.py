"""Stage 2 (federated paradigm): train over Flower's simulation engine, or over a
given Grid (a real SuperLink). One round is ``server/driver.py``; the loop around the
rounds is :func:`fedsynth.training.round_loop.run_rounds`; with ``federation.finetune_steps`` one more
round (:func:`fedsynth.server.oneshot.finetune_round`) has every client fine-tune the result."""

from __future__ import annotations

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, resolve_device
from fedsynth.runtime.simulation import on_grid
from fedsynth.server.calibration import server_train
from fedsynth.server.driver import FederatedDriver
from fedsynth.server.oneshot import finetune_round
from fedsynth.stages.prepare import Prepared
from fedsynth.training.round_loop import Model, run_rounds
from fedsynth.training.tasks import seeded_model


def train_federated(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    *,
    resume: bool,
    grid: Grid | None = None,
    client_app: ClientApp | None = None,
) -> None:
    full = prepared.data.full
    unet = seeded_model(cfg, cfg.seed, full.shape[1], full.shape[0], full.num_classes, full.class_names)
    unet = unet.to(resolve_device(cfg.train.device))
    scheduler = build_train_scheduler(cfg.diffusion) if cfg.task == "diffusion" else None
    if not resume and cfg.phoenix.warmup_steps > 0:
        warm_up(cfg, run, unet, scheduler, prepared)
    model = Model(unet, make_ema(unet, cfg.federation.server_ema_decay, cfg.trained_modules), scheduler)

    def body(g: Grid) -> None:
        names, test, proxy = tuple(full.class_names), prepared.data.test, prepared.shared_data()
        driver = FederatedDriver(cfg, run, model, names, g, test=test, proxy=proxy)
        run_rounds(driver, run, cfg, resume=resume)
        if cfg.federation.finetune_steps:
            finetune_round(cfg, run, prepared, g, model, ledger=driver.privacy)

    on_grid(cfg, body, grid, client_app)


def warm_up(cfg: Config, run: RunDir, unet, scheduler, prepared: Prepared) -> None:
    """Phoenix: the initial global model is trained on the shared set G first."""
    shared = prepared.shared_data()
    assert shared is not None, "config validation guarantees phoenix.beta > 0 with a warm-up"
    loss, seconds = server_train(cfg, unet, scheduler, shared, cfg.phoenix.warmup_steps, tag=0)
    run.update_summary(shared_images=len(shared), warmup_loss=loss, warmup_s=seconds)

"""Stage 2 (federated paradigm): train over Flower's simulation engine, or over a
given Grid (a real SuperLink). The round loop itself lives in ``server/loop.py``."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedsynth.config import Config
from fedsynth.diffusion.training import resolve_device
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.prepare import Prepared
from fedsynth.rundir import RunDir


def train_federated(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    *,
    resume: bool,
    grid: Grid | None = None,
    client_app: ClientApp | None = None,
) -> None:
    from fedsynth.server.loop import serve

    full = prepared.data.full
    unet = seeded_unet(cfg.model, cfg.seed, full.shape[1], full.shape[0], full.num_classes)
    unet = unet.to(resolve_device(cfg.train.device))
    if not resume and cfg.phoenix.warmup_steps > 0:
        warm_up(cfg, run, unet, prepared)

    def body(g: Grid) -> None:
        serve(g, cfg, run, unet, list(full.class_names), resume=resume)

    if grid is not None:
        body(grid)
    else:
        simulate(cfg, body, client_app)


def warm_up(cfg: Config, run: RunDir, unet, prepared: Prepared) -> None:
    """Phoenix: the initial global model is trained on the shared set G first."""
    from fedsynth.diffusion.schedule import build_train_scheduler
    from fedsynth.server.calibration import server_train

    shared = prepared.shared_data()
    assert shared is not None, "config validation guarantees phoenix.beta > 0 with a warm-up"
    loss, seconds = server_train(
        cfg, unet, build_train_scheduler(cfg.diffusion), shared, cfg.phoenix.warmup_steps, tag=0
    )
    run.update_summary(shared_images=len(shared), warmup_loss=loss, warmup_s=seconds)


def simulate(cfg: Config, body, client_app: ClientApp | None = None) -> None:
    """Run ``body(grid)`` as the ServerApp of a Flower simulation with one SuperNode per client."""
    from flwr.simulation import run_simulation

    from fedsynth.client.app import app as default_client_app
    from fedsynth.server.app import make_server_app

    fed = cfg.federation
    errors: list[BaseException] = []

    def guarded(grid: Grid) -> None:
        try:
            body(grid)
        except BaseException as exc:  # re-raised below with its own message
            errors.append(exc)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(
        server_app=make_server_app(guarded),
        client_app=client_app or default_client_app,
        num_supernodes=cfg.partition.num_clients,
        backend_config={
            "client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus},
            "init_args": {"include_dashboard": False, "log_to_driver": True, "num_cpus": os.cpu_count() or 1},
        },
    )
    if errors:
        raise errors[0]

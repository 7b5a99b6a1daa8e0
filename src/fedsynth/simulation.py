"""Flower's simulation engine for ``fedsynth run``: the ServerApp body runs with one
simulated SuperNode per client, in this process (used by the federated and local paradigms).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsynth.client.app import app as default_client_app
from fedsynth.config import Config


def make_server_app(body: Callable[[Grid], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        body(grid)

    return app


def on_grid(
    cfg: Config, body: Callable[[Grid], None], grid: Grid | None = None, client_app: ClientApp | None = None
) -> None:
    """``body(grid)`` on a given Grid (a real SuperLink), else in a simulation."""
    if grid is not None:
        body(grid)
    else:
        simulate(cfg, body, client_app)


def simulate(cfg: Config, body: Callable[[Grid], None], client_app: ClientApp | None = None) -> None:
    """Run ``body(grid)`` as the ServerApp of a Flower simulation with one SuperNode per client."""
    from flwr.simulation import run_simulation  # starts Ray: imported only when simulating

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

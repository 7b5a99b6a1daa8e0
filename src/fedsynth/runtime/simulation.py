"""Flower's simulation engine for ``fedsynth run``: the ServerApp body runs with one
simulated SuperNode per client, in this process (used by the federated and local paradigms).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsynth.client.app import app as default_client_app
from fedsynth.config import Config
from fedsynth.runtime.processes import quiet_flower


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


@contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """Keep the process's SIGTERM handler (the CLI's: stop, keep checkpoints, exit 143) while
    Ray starts. ``ray.init`` replaces it with ``sys.exit`` and Ray's native crash handler
    turns SIGTERM into an abort with a stack dump (exit 134): the first is skipped here,
    the second switched off by its documented variable."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")  # read when Ray is imported
    import ray._private.utils as ray_utils  # the one place fedsynth reaches into Ray

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def simulate(cfg: Config, body: Callable[[Grid], None], client_app: ClientApp | None = None) -> None:
    """Run ``body(grid)`` as the ServerApp of a Flower simulation with one SuperNode per client."""
    fed = cfg.federation
    errors: list[BaseException] = []

    def guarded(grid: Grid) -> None:
        try:
            body(grid)
        except BaseException as exc:  # re-raised below with its own message
            errors.append(exc)

    quiet_flower()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with keep_sigterm_handler():
        from flwr.simulation import run_simulation  # imports Ray: only when simulating

        run_simulation(
            server_app=make_server_app(guarded),
            client_app=client_app or default_client_app,
            num_supernodes=cfg.partition.num_clients,
            backend_config={
                "client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus},
                "init_args": {
                    "include_dashboard": False,
                    "log_to_driver": True,
                    "num_cpus": os.cpu_count() or 1,
                },
            },
        )
    if errors:
        raise errors[0]

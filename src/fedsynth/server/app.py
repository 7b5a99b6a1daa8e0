"""The Flower ServerApp: a thin adapter that hands the Grid to the fedsynth pipeline.

- ``fedsynth run`` (simulation) builds one with :func:`make_server_app` around the
  already-prepared run.
- ``flwr run .`` / a SuperLink uses the module-level ``app``: it reads ``config``
  (TOML path), ``out`` (run directory) and ``resume`` from the run config
  (``[tool.flwr.app.config]`` in pyproject or ``--run-config``) and runs every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


def make_server_app(body: Callable[[Grid], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        body(grid)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedsynth.config import load_config
    from fedsynth.pipeline import run_all
    from fedsynth.rundir import RunDir

    rc = context.run_config
    out = Path(str(rc.get("out", "runs/flwr")))
    resume = bool(rc.get("resume", False))
    config_path = RunDir(out).config if resume else Path(str(rc["config"]))
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(config_path, overrides)
    run = run_all(cfg, out, resume=resume, grid=grid)
    print(f"report: {run.report}")

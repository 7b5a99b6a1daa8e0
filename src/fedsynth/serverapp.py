"""The Flower ServerApp for ``flwr run .`` / a SuperLink (``[tool.flwr.app.components]``).

It reads ``config`` (TOML path), ``out`` (run directory), ``resume`` and ``overrides``
from the run config (``[tool.flwr.app.config]`` in pyproject or ``--run-config``) and runs
every stage, as ``fedsynth run`` does; ``fedsynth run`` itself builds its simulation
ServerApp with :func:`fedsynth.simulation.make_server_app`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsynth.config import load_config
from fedsynth.pipeline import run_all
from fedsynth.rundir import RunDir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc.get("out", "runs/flwr")))
    resume = bool(rc.get("resume", False))
    config_path = RunDir(out).config if resume else Path(str(rc["config"]))
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(config_path, overrides)
    run = run_all(cfg, out, resume=resume, grid=grid)
    print(f"report: {run.report}")

"""The Flower ServerApp for ``flwr run .`` / a SuperLink (``[tool.flwr.app.components]``).

It reads ``config`` (TOML path), ``out`` (run directory), ``resume`` and ``overrides``
(``;``-separated) from the run config (``[tool.flwr.app.config]`` in pyproject or
``--run-config``) and runs every stage. ``fedsynth run`` runs this app on a local SuperLink
(:mod:`fedsynth.runtime.superlink`), which turns the failure line printed here back into one error.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsynth.config import load_config
from fedsynth.core.errors import FedsynthError, first_line
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.training import use_threads
from fedsynth.pipeline import run_all
from fedsynth.runtime.superlink import CRASH_MARK, ERROR_MARK, REPORT_MARK

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_stages(grid, context)
    except FedsynthError as exc:  # one line for the user: fedsynth.runtime.superlink raises it again
        print(f"\n{ERROR_MARK}{first_line(exc)}", flush=True)
        raise
    except Exception as exc:
        print(f"\n{CRASH_MARK}{type(exc).__name__}: {first_line(exc)}", flush=True)
        raise


def run_stages(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc.get("out", "runs/flwr")))
    resume = bool(rc.get("resume", False))
    config_path = RunDir(out).config if resume else Path(str(rc["config"]))
    overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config(config_path, overrides)
    use_threads(cfg.train.threads)
    run = run_all(cfg, out, resume=resume, grid=grid)
    print(f"{REPORT_MARK}{run.report}", flush=True)

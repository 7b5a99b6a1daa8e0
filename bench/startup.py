"""Start-up cost of the ways to simulate a federation, side by side in one run.

``federation.engine = "in-process"`` simulates in the CLI's own process (Flower's deprecated
``run_simulation``); Flower 1.41's supported path is ``flwr run`` against a SuperLink in
simulation mode, which runs the app in a separate ``flwr-simulation`` process — what
``fedsynth run`` does by default (``federation.engine = "superlink"``), and what a user does by
hand with ``flower-superlink`` + ``flwr run``. All run the same tiny federated job (2
clients, 2 rounds, tiny UNet), so the differences are start-up and teardown, not training.

The by-hand SuperLink is started with :func:`fedsynth.runtime.superlink.start_superlink` (the one
``fedsynth run`` uses: ``--disable-runtime-dependency-installation``, so nothing is
downloaded; by default ``flwr run`` on a fresh machine creates a runtime environment with
``uv sync``) on private ports and a private ``FLWR_HOME``, and stopped at the end.
Results: bench/results/startup/startup.{json,md}.

    .venv/bin/python bench/startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, result_file, run_command, timed_command, write_result
from fedsynth.config.presets import TINY as PRESET
from fedsynth.runtime.processes import stop
from fedsynth.runtime.superlink import flower_env, start_superlink

CONFIG = "configs/digits-federated.toml"
TINY = list(PRESET)  # the test suite's tiny run
BIN = Path(sys.executable).parent


def cli(out: Path, engine: str) -> float:
    """Wall seconds of ``fedsynth run`` with ``federation.engine = engine``."""
    overrides = [*TINY, f'federation.engine="{engine}"']
    return timed_command(run_command(CONFIG, out, overrides), "fedsynth run")


def via_superlink(out: Path) -> tuple[float, float]:
    """Seconds to a running SuperLink, and seconds for ``flwr run`` of the job on it."""
    home = Path(tempfile.mkdtemp(prefix="fedsynth-flwr-home-"))
    env = flower_env(home)
    start = time.perf_counter()
    link = start_superlink(home, env)
    ready = time.perf_counter() - start
    try:
        run_config = f'out="{out}" overrides="{";".join(TINY)}" config="{ROOT / CONFIG}"'
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "local", "--stream", "--run-config", run_config]
        cmd += ["--federation-config", "num-supernodes=2"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0 or not (out / "report.md").exists():
            raise SystemExit(f"flwr run failed: {(res.stdout + res.stderr).strip().splitlines()[-5:]}")
        return ready, time.perf_counter() - start - ready
    finally:
        stop(link)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedsynth-startup-"))
    rows = []
    for i in range(args.repeats):
        inproc = cli(work / f"inproc-{i}", "in-process")
        engine = cli(work / f"engine-{i}", "superlink")
        ready, run = via_superlink(work / f"superlink-{i}")
        rows.append(
            {
                "repeat": i,
                "fedsynth_run_s": round(inproc, 1),
                "fedsynth_run_superlink_s": round(engine, 1),
                "superlink_start_s": round(ready, 1),
                "flwr_run_s": round(run, 1),
                "superlink_total_s": round(ready + run, 1),
            }
        )
        print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    write_result("startup", {"config": CONFIG, "overrides": TINY, "rows": rows})
    lines = [
        "# Simulation start-up: in-process `run_simulation` vs `flwr run` on a SuperLink\n",
        "The same tiny federated job (2 clients × 2 rounds, tiny UNet, sampling and evaluation "
        "included), alternating, in one run of `bench/startup.py`: `fedsynth run` with "
        '`federation.engine = "in-process"`, `fedsynth run` with the default '
        '`federation.engine = "superlink"` (its own SuperLink, started and stopped inside the '
        "command), and by hand: a SuperLink started once, then `flwr run`. Every SuperLink runs in "
        "simulation mode with runtime dependency installation disabled.\n",
        "| repeat | in-process s | `fedsynth run` (superlink) s | SuperLink start s | `flwr run` s "
        "| by hand total s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['repeat']} | {r['fedsynth_run_s']} | {r['fedsynth_run_superlink_s']} | "
            f"{r['superlink_start_s']} | {r['flwr_run_s']} | {r['superlink_total_s']} |"
            for r in rows
        ),
    ]
    (result_file("startup", ".md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Federated-simulation overhead vs the centralized baseline doing the same optimizer steps
(rounds × clients per round × local steps, as in Senden 2025's Table 3), measured in one run.

Reports the steady-state time per round (median over rounds after the first) of each and
their ratio, and the one-off start-up cost (whole-run wall time minus the rounds' time).

    .venv/bin/python bench/overhead.py [--rounds 8] [--local-steps 20] [--preset small]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import timed_fedsynth_run, write_result


def timed_run(paradigm: str, args, out: Path) -> dict:
    sets = [
        f"paradigm={json.dumps(paradigm)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"model.preset={json.dumps(args.preset)}",
        "sample.per_class=0",
        "eval.enabled=false",
        f"federation.checkpoint_every={args.rounds}",
    ]
    total, rounds = timed_fedsynth_run("configs/digits-federated.toml", out, sets, paradigm)
    walls = [r["wall_s"] for r in rounds]
    return {
        "process_wall_s": total,
        "round_wall_s": walls,
        "steady_round_s": statistics.median(walls[1:]),
        "startup_s": total - sum(walls),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        central = timed_run("centralized", args, Path(tmp) / "central")
        federated = timed_run("federated", args, Path(tmp) / "federated")
    write_result(
        "overhead",
        {
            "settings": {
                "preset": args.preset,
                "rounds": args.rounds,
                "clients_per_round": 4,
                "local_steps": args.local_steps,
                "steps_per_round": 4 * args.local_steps,
            },
            "centralized": central,
            "federated": federated,
            "steady_round_ratio": federated["steady_round_s"] / central["steady_round_s"],
            "extra_startup_s": federated["startup_s"] - central["startup_s"],
            "goal": "steady_round_ratio <= 1.10 (Senden 2025: 1.50)",
        },
    )


if __name__ == "__main__":
    main()

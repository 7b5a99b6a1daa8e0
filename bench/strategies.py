"""Seed 000's Table 2 at our scale: every strategy on class-disjoint digits, 8 clients,
4 per round, equal compute, plus the centralized baseline doing the same optimizer steps.

Each run is a separate ``fedsynth run`` (train → sample → evaluate) in RUNS_DIR/<name>;
results go to bench/results/strategies.json and bench/results/strategies.md.

    .venv/bin/python bench/strategies.py [--rounds 10] [--local-steps 20] [--per-class 50]
        [--only fedavg,fedyogi] [--runs-dir runs/bench-strategies]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]
NAMES = (
    "fedavg",
    "fedmedian",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "scaffold",
)
KEYS = (
    "fd",
    "precision",
    "recall",
    "cas_accuracy",
    "cas_precision",
    "cas_recall",
    "cas_f1",
    "real_accuracy",
    "wall_s",
    "train_wall_s",
    "bytes_up",
    "bytes_down",
)


def run_one(name: str, paradigm: str, args, out: Path) -> dict:
    sets = [
        f"paradigm={json.dumps(paradigm)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"sample.per_class={args.per_class}",
    ]
    if paradigm == "federated":
        sets.append(f"strategy.name={json.dumps(name)}")
    cmd = [
        str(Path(sys.executable).with_name("fedsynth")),
        "run",
        str(ROOT / "configs/digits-federated.toml"),
        "--out",
        str(out),
    ] + [x for s in sets for x in ("--set", s)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {
            "error": (res.stderr.strip().splitlines() or ["?"])[-1],
            "wall_s": time.perf_counter() - start,
        }
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary.get(k) for k in KEYS}


def table(rows: dict[str, dict], central_cas: float | None) -> str:
    head = (
        "| algorithm | FD ↓ | precision ↑ | recall ↑ | CAS accuracy ↑ | CAS F1 ↑ | CAS / centralized "
        "| wall s | MB up+down |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        ratio = f"{r['cas_accuracy'] / central_cas:.3f}" if central_cas else "–"
        mb = (r["bytes_up"] + r["bytes_down"]) / 1e6
        lines.append(
            f"| {name} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['cas_accuracy']:.2%} "
            f"| {r['cas_f1']:.2%} | {ratio} | {r['wall_s']:.0f} | {mb:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--only", default="")
    ap.add_argument("--runs-dir", default="runs/bench-strategies")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(NAMES)
    runs = ROOT / args.runs_dir / time.strftime("%Y%m%d-%H%M%S")
    rows: dict[str, dict] = {"centralized": run_one("centralized", "centralized", args, runs / "centralized")}
    print("centralized", rows["centralized"], flush=True)
    for name in names:
        rows[name] = run_one(name, "federated", args, runs / name)
        print(name, rows[name], flush=True)
    central = rows["centralized"].get("cas_accuracy")
    settings = {
        "dataset": "digits 16x16",
        "partition": "class_disjoint",
        "num_clients": 8,
        "clients_per_round": 4,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "optimizer_steps": args.rounds * 4 * args.local_steps,
        "per_class": args.per_class,
        "preset": "small",
        "sampler": "ddim-25",
    }
    write_result("strategies", {"settings": settings, "rows": rows})
    md = [
        "# Strategies on class-disjoint digits (seed 000's Table 2 layout)",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()),
        "",
        table(rows, central),
        "",
        "FD is in the domain classifier's feature space (lower is better). Reproduce: "
        f"`.venv/bin/python bench/strategies.py --rounds {args.rounds} --local-steps {args.local_steps} "
        f"--per-class {args.per_class}`.",
    ]
    (RESULTS / "strategies.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

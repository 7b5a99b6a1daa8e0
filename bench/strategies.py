"""Senden 2025's Table 2 at our scale: every strategy on class-disjoint digits, 8 clients,
4 per round, equal compute, plus the centralized baseline doing the same optimizer steps.

Each run is a separate ``fedsynth run`` (train → sample → evaluate) in RUNS_DIR/<name>;
results go to bench/results/strategies/strategies.json and bench/results/strategies/strategies.md.

    .venv/bin/python bench/strategies.py [--rounds 10] [--local-steps 20] [--per-class 50]
        [--only fedavg,fedyogi] [--runs-dir runs/bench-strategies]
        [--set train.lr=3e-4] [--result strategies-60x10]

``--set`` adds config overrides to every run (federated and centralized); ``--result`` names
the results file, so a table in another regime keeps the first one beside it. The results
file is rewritten after every run (an interrupted benchmark keeps its finished rows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import ROOT, fedsynth_run, result_file, write_result
from fedsynth.config import STRATEGY_NAMES
from fedsynth.evaluation.evaluate import SUMMARY_KEYS
from fedsynth.report.compare import comparison_table

KEYS = (*SUMMARY_KEYS, "wall_s", "train_wall_s", "bytes_up", "bytes_down")


def run_one(name: str, paradigm: str, args, out: Path) -> dict:
    sets = [
        f"paradigm={json.dumps(paradigm)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"sample.per_class={args.per_class}",
        *args.set,
    ]
    if paradigm == "federated":
        sets.append(f"strategy.name={json.dumps(name)}")
    start = time.perf_counter()
    res = fedsynth_run("configs/digits-federated.toml", out, sets)
    if res.returncode != 0:
        return {
            "error": (res.stderr.strip().splitlines() or ["?"])[-1],
            "wall_s": time.perf_counter() - start,
        }
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary.get(k) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--only", default="")
    ap.add_argument("--runs-dir", default="runs/bench-strategies")
    ap.add_argument("--set", action="append", default=[], help="a config override for every run")
    ap.add_argument("--result", default="strategies", help="results file name under bench/results")
    ap.add_argument("--render", action="store_true", help="only rebuild strategies.md from strategies.json")
    ap.add_argument(
        "--collect", default="", help="rebuild the results from the summary.json of existing runs"
    )
    args = ap.parse_args()
    if args.render:
        saved = json.loads((result_file(args.result, ".json")).read_text())
        render(saved["settings"], saved["rows"], args.result)
        return
    names = [n for n in args.only.split(",") if n] or list(STRATEGY_NAMES)
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
        "overrides": args.set,
    }

    def save(rows: dict[str, dict]) -> None:
        write_result(args.result, {"settings": settings, "rows": rows})
        render(settings, rows, args.result)

    if args.collect:
        rows = {}
        for name in ("centralized", *names):
            summary = Path(args.collect) / name / "summary.json"
            if summary.is_file():
                rows[name] = {k: json.loads(summary.read_text()).get(k) for k in KEYS}
        save(rows)
        return
    runs = ROOT / args.runs_dir / time.strftime("%Y%m%d-%H%M%S")
    rows = {"centralized": run_one("centralized", "centralized", args, runs / "centralized")}
    print("centralized", rows["centralized"], flush=True)
    for name in names:
        rows[name] = run_one(name, "federated", args, runs / name)
        print(name, rows[name], flush=True)
        save(rows)


def render(settings: dict, rows: dict[str, dict], result: str = "strategies") -> None:
    central = rows["centralized"].get("cas_accuracy")
    ratios = [
        f"| {name} | {r['cas_accuracy'] / central:.3f} |"
        for name, r in rows.items()
        if "cas_accuracy" in r and central
    ]
    md = [
        "# Strategies on class-disjoint digits (Senden 2025's Table 2 layout)",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()),
        "",
        comparison_table(rows),
        "",
        "CAS accuracy relative to the centralized baseline:",
        "",
        "| run | CAS / centralized |",
        "| --- | --- |",
        *ratios,
        "",
        "FD is in the domain classifier's feature space (lower is better); wall s includes sampling "
        "and evaluation and is affected by any other load on the machine during the run. MultiKrum "
        "with the default m = n − f keeps every client and so equals FedAvg. "
        "Reproduce: `.venv/bin/python bench/strategies.py "
        f"--rounds {settings['rounds']} --local-steps {settings['local_steps']} "
        f"--per-class {settings['per_class']}"
        + "".join(f" --set {value}" for value in settings.get("overrides", []))
        + (f" --result {result}`." if result != "strategies" else "`."),
    ]
    (result_file(result, ".md")).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

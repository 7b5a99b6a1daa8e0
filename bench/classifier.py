"""Train the downstream classifier federatedly, or a generative model federatedly and share
its synthetic data? (task ``classifier`` vs CAS of a generative run, same federation)

A row trains the domain-classifier CNN over a federation (``configs/digits-classifier.toml``:
the demo's 8 class-disjoint clients, 4 per round, rounds × local steps = 600 sequential
steps) and records the global model's test accuracy every round. The markdown table sets
each setting's best and last accuracy beside the CAS (a classifier trained only on synthetic
data, judged on the same real test split) of the generative rows in
``bench/results/quality/quality.json`` for the same setting. Rows are keyed (setting, strategy,
rounds, seed) and kept when already present.

    .venv/bin/python bench/classifier.py --settings disjoint,dirichlet --strategies fedavgm,fedavg \
        --rounds 30,120 --seeds 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

from _common import result_file, run_missing, timed_fedsynth_run

CONFIG = "configs/digits-classifier.toml"
SEQUENTIAL_STEPS = 600
SETTINGS = {
    "disjoint": [],
    "dirichlet": ['partition.scheme="dirichlet"', "partition.alpha=0.1", "partition.num_clients=10"],
}


def run_row(setting: str, strategy: str, rounds: int, seed: int, runs: Path) -> dict:
    out = runs / setting / f"{strategy}-r{rounds}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    local = SEQUENTIAL_STEPS // rounds
    sets = [f"seed={seed}", *SETTINGS[setting], f'strategy.name="{strategy}"']
    sets += [
        f"federation.rounds={rounds}",
        f"train.local_steps={local}",
        f"federation.checkpoint_every={rounds}",
    ]
    wall, lines = timed_fedsynth_run(CONFIG, out, sets, f"{setting}/{strategy}")
    summary = json.loads((out / "summary.json").read_text())
    mb = sum(r["bytes_up"] + r["bytes_down"] for r in lines) / 1e6
    return {
        "setting": setting,
        "strategy": strategy,
        "rounds": rounds,
        "local_steps": local,
        "seed": seed,
        "best_test_accuracy": summary["best_test_accuracy"],
        "test_accuracy": summary["test_accuracy"],
        "rounds_to_95pct_best": summary["rounds_to_95pct_best"],
        "accuracy_per_round": [r["test_accuracy"] for r in lines],
        "mb_exchanged": round(mb, 1),
        "wall_s": round(wall, 1),
    }


def generative_rows(setting: str) -> list[dict]:
    path = result_file("quality", ".json")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return [r for r in rows if r["setting"] == setting and not r["method"].startswith("centralized")]


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | trained federatedly | rounds × local steps | seed | test accuracy (best / last) "
        "| rounds to 95% of best | MB up + down |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["setting"], r["strategy"], r["rounds"], r["seed"])):
        lines.append(
            f"| {r['setting']} | classifier, {r['strategy']} | {r['rounds']} × {r['local_steps']} "
            f"| {r['seed']} "
            f"| {100 * r['best_test_accuracy']:.1f}% / {100 * r['test_accuracy']:.1f}% "
            f"| {r['rounds_to_95pct_best']} | {r['mb_exchanged']:.0f} |"
        )
    for setting in sorted({r["setting"] for r in rows}):
        for g in sorted(generative_rows(setting), key=lambda g: -(g["cas_accuracy"] or 0))[:3]:
            ft = f" + {g['finetune_steps']} fine-tuning" if g.get("finetune_steps") else ""
            lines.append(
                f"| {setting} | diffusion model, {g['method']} → CAS "
                f"| {g['rounds']} × {g['local_steps']}{ft} "
                f"| {g['seed']} | {100 * g['cas_accuracy']:.1f}% | – | {g['mb_exchanged']:.0f} |"
            )
    return "\n".join(lines) + "\n"


HEADER = (
    "# Federated classifier vs classifier on federated synthetic data (`bench/classifier.py`)\n\n"
    "Task `classifier` (`configs/digits-classifier.toml`: the domain-classifier CNN, AdamW lr 1e-3, "
    "600 sequential steps = rounds × local steps, 4 clients per round, server EMA off) against the "
    "three best generative rows of `bench/results/quality/quality.json` in the same setting (their CAS: a "
    "classifier of the same architecture trained only on 1,000 synthetic images). Both are judged "
    "on the same held-out real test split. `disjoint`: 8 class-disjoint clients; `dirichlet`: 10 "
    "clients, α = 0.1.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default="disjoint")
    p.add_argument("--strategies", default="fedavgm")
    p.add_argument("--rounds", default="30")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-classifier"))
    args = p.parse_args()
    keys = itertools.product(
        args.settings.split(","), args.strategies.split(","), map(int, args.rounds.split(",")),
        map(int, args.seeds.split(",")),
    )  # fmt: skip
    run_missing(
        "classifier", keys, lambda r: (r["setting"], r["strategy"], r["rounds"], r["seed"]),
        lambda *key: run_row(*key, args.runs_dir), lambda rows: HEADER + table(rows),
        payload=lambda rows: {"config": CONFIG},
    )  # fmt: skip


if __name__ == "__main__":
    main()

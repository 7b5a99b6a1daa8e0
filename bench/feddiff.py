"""FedDiff's Table 1 at our scale: best test accuracy and rounds to 95% of the best, per
server strategy, for the federated classifier (task ``classifier``), plus FedDiff as the
consolidation of the generative model.

Classifier rows (``--part classifier``): ``configs/digits-classifier.toml`` with the paper's
federation — Dirichlet α = 0.5 over 10 clients, 5 per round — for ``--rounds`` rounds of
``--local-steps`` steps. Every method runs on the same partition: 4% of the clients' images
(uniformly over classes) are held out as FedDiff's proxy set (``phoenix.beta = 4``,
``phoenix.alpha = 0``), used only by FedDiff's server. SCAFFOLD and its FedAvg twin run with
SGD clients (its paper's setting); the others with AdamW (lr 1e-3, the paper's local lr).

Generative rows (``--part generative``): ``configs/digits-federated.toml`` (the 8
class-disjoint clients, 30 rounds × 20 steps) with FedAvg vs FedDiff over FedAvg, same
proxy set: FD / CAS / label fidelity at equal rounds.

Rows are keyed (part, method, seed) and kept when already present.

    .venv/bin/python bench/feddiff.py --part classifier --methods fedavg,feddiff --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
from pathlib import Path

from _common import run_missing, timed_fedsynth_run

PROXY = ["phoenix.beta=4", "phoenix.alpha=0"]
CLASSIFIER = {
    "config": "configs/digits-classifier.toml",
    "sets": [
        'partition.scheme="dirichlet"',
        "partition.alpha=0.5",
        "partition.num_clients=10",
        "federation.clients_per_round=5",
        *PROXY,
    ],
}
GENERATIVE = {"config": "configs/digits-federated.toml", "sets": PROXY}
# the same federation as the classifier rows, training the demo's generative model instead
# (20 rounds × 20 steps + 100 fine-tuning steps): its CAS beside their test accuracy
SYNTHETIC = {"config": "configs/digits-federated-finetune.toml", "sets": CLASSIFIER["sets"]}
SGD = ['train.optimizer="sgd"', "train.lr=0.05", "train.weight_decay=0"]
METHODS: dict[str, list[str]] = {
    "fedavg": ['strategy.name="fedavg"'],
    "fedavgm": ['strategy.name="fedavgm"'],
    "fedadam": ['strategy.name="fedadam"'],
    "fedavg-sgd": ['strategy.name="fedavg"', *SGD],
    "scaffold-sgd": ['strategy.name="scaffold"', *SGD],
    "fedavg-sgd0.2": ['strategy.name="fedavg"', *SGD[:1], "train.lr=0.2", *SGD[2:]],
    "scaffold-sgd0.2": ['strategy.name="scaffold"', *SGD[:1], "train.lr=0.2", *SGD[2:]],
    "feddiff": ['strategy.name="feddiff"'],
    "fedavgm-ft100": ['strategy.name="fedavgm"'],
    "feddiff-t200": ['strategy.name="feddiff"', "feddiff.t_final=200"],
    "feddiff-renoise": ['strategy.name="feddiff"', "feddiff.renoise=true"],
}


FASHION = ['data.dataset="fashion-mnist"', "data.image_size=28"]
PARTS = {"classifier": [], "classifier-fashion": FASHION}  # the classifier rows' datasets


def run_fedsynth(part: str, method: str, seed: int, config: str, sets: list[str], runs: Path) -> tuple:
    """One ``fedsynth run`` of a row: (summary, metrics lines, the fields every part records —
    the row's key, FedDiff's server cost, traffic and wall time)."""
    out = runs / part / f"{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    wall, lines = timed_fedsynth_run(
        config, out, [f"seed={seed}", *sets, *METHODS[method]], f"{part}/{method}"
    )
    summary = json.loads((out / "summary.json").read_text())
    common = {
        "part": part,
        "method": method,
        "seed": seed,
        "server_s_per_round": statistics.mean(r.get("feddiff", {}).get("server_s", 0.0) for r in lines),
        "pretrain_s": summary.get("feddiff", {}).get("pretrain_s", 0.0),
        "mb_exchanged": round(sum(r["bytes_up"] + r["bytes_down"] for r in lines) / 1e6, 1),
        "wall_s": round(wall, 1),
    }
    return summary, lines, common


def classifier_row(part: str, method: str, seed: int, rounds: int, local: int, runs: Path) -> dict:
    sets = [*CLASSIFIER["sets"], *PARTS[part]]
    sets += [
        f"federation.rounds={rounds}",
        f"train.local_steps={local}",
        f"federation.checkpoint_every={rounds}",
    ]
    summary, lines, common = run_fedsynth(part, method, seed, CLASSIFIER["config"], sets, runs)
    return {
        **common,
        "rounds": rounds,
        "local_steps": local,
        "best_test_accuracy": summary["best_test_accuracy"],
        "test_accuracy": summary["test_accuracy"],
        "rounds_to_95pct_best": summary["rounds_to_95pct_best"],
        "accuracy_per_round": [r["test_accuracy"] for r in lines],
    }


def generative_row(part: str, method: str, seed: int, runs: Path) -> dict:
    setup = GENERATIVE if part == "generative" else SYNTHETIC
    sets = [*setup["sets"], "federation.checkpoint_every=30"]
    summary, lines, common = run_fedsynth(part, method, seed, setup["config"], sets, runs)
    keys = ("fd", "cas_accuracy", "label_fidelity")
    return {**common, "rounds": len(lines), **{k: summary[k] for k in keys}}


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def classifier_table(cls: list[dict]) -> list[str]:
    out = [
        "| method | seeds | best test accuracy % (mean ± std) | rounds to 95% of best (mean ± std) "
        "| last accuracy % | server s / round | pre-training s | MB up + down |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in cls)]:
        mine = [r for r in cls if r["method"] == method]
        out.append(
            f"| {method} | {len(mine)} | {_mean_std([100 * r['best_test_accuracy'] for r in mine])} "
            f"| {_mean_std([r['rounds_to_95pct_best'] for r in mine])} "
            f"| {_mean_std([100 * r['test_accuracy'] for r in mine])} "
            f"| {statistics.mean(r['server_s_per_round'] for r in mine):.2f} "
            f"| {statistics.mean(r['pretrain_s'] for r in mine):.0f} "
            f"| {statistics.mean(r['mb_exchanged'] for r in mine):.0f} |"
        )
    return out


PART_CAPTIONS = {
    "generative": "FedDiff consolidating the generative model (`configs/digits-federated.toml`: 8 "
    "class-disjoint clients, 30 rounds × 20 steps, same proxy set), FedAvg as its base and as the "
    "baseline:",
    "synthetic": "The classifier rows' federation training the demo's generative model instead "
    "(`configs/digits-federated-finetune.toml`: FedAvgM, 20 rounds × 20 steps, then 100 fine-tuning "
    "steps per client; Dirichlet α = 0.5, 10 clients, 5 per round): CAS is the test accuracy of a "
    "classifier of the same architecture trained only on its synthetic data.",
}


def table(rows: list[dict]) -> str:
    out = classifier_table([r for r in rows if r["part"] == "classifier"])
    fashion = [r for r in rows if r["part"] == "classifier-fashion"]
    if fashion:
        rounds = fashion[0]["rounds"]
        out += ["", f"The same on Fashion-MNIST (28×28, 60,000 images; {rounds} rounds × 10 steps):", ""]
        out += classifier_table(fashion)
    for part, caption in PART_CAPTIONS.items():
        gen = sorted((r for r in rows if r["part"] == part), key=lambda r: (r["method"], r["seed"]))
        if not gen:
            continue
        out += [
            "",
            caption,
            "",
            "| method | seed | FD ↓ | CAS ↑ | label fidelity ↑ | server s / round | pre-training s | MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| {r['method']} | {r['seed']} | {r['fd']:.2f} | {100 * r['cas_accuracy']:.1f}% "
            f"| {r['label_fidelity']:.2f} | {r['server_s_per_round']:.2f} | {r['pretrain_s']:.0f} "
            f"| {r['mb_exchanged']:.0f} |"
            for r in gen
        ]
    return "\n".join(out) + "\n"


HEADER = (
    "# FedDiff vs server strategies (`bench/feddiff.py`)\n\n"
    "Table 1's protocol at our scale: the domain-classifier CNN trained federatedly on digits, "
    "Dirichlet α = 0.5 over 10 clients, 5 per round; 4% of the images held out as the proxy set "
    "for every method (only FedDiff's server uses it). Best test accuracy over the rounds and the "
    "first round reaching 95% of that best, mean ± std over seeds. SGD rows: clients use SGD "
    "(lr 0.05, or the lr in the name); the others AdamW lr 1e-3.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=(*PARTS, "generative", "synthetic"), default="classifier")
    p.add_argument("--methods", default="fedavg,fedavgm,fedadam,fedavg-sgd,scaffold-sgd,feddiff")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-feddiff"))
    args = p.parse_args()

    def run(method: str, seed: int) -> dict:
        if args.part in PARTS:
            return classifier_row(args.part, method, seed, args.rounds, args.local_steps, args.runs_dir)
        return generative_row(args.part, method, seed, args.runs_dir)

    keys = itertools.product(args.methods.split(","), map(int, args.seeds.split(",")))
    run_missing(
        "feddiff", keys, lambda r: (r["method"], r["seed"]) if r["part"] == args.part else (),
        run, lambda rows: HEADER + table(rows),
    )  # fmt: skip


if __name__ == "__main__":
    main()

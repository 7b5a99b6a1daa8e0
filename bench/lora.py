"""Fine-tuning a public base across data holders: every weight, a module subset, or LoRA adapters.

The base is bench/privacy.py's public model (the centralized Fashion-MNIST configuration
trained at 16×16 without DP: its data lies outside the federation), started from through
``model.init``. Every federated row is the demo's federation and compute
(``configs/digits-federated-finetune.toml``: class-disjoint digits, 8 clients, 4 per round,
FedAvgM, 20 rounds × 20 local steps, then 100 fine-tuning steps per client); rows differ only
in what trains and so travels:

- ``scratch``: today's demo (no base, every weight);
- ``full-ft``: from the base, every weight;
- ``path``: from the base, only the conditioning path (``train.trainable``);
- ``lora<r>-<fedavg|ffa>``: from the base, rank-r LoRA adapters (A and B averaged apart, or
  FFA-LoRA: A frozen, only B trained and sent) plus the class embedding (the base's classes
  are Fashion-MNIST's, the federation's are digits);
- ``central-ft``: centralized from the base, every weight, the federation's 2,400 steps, lr and
  guidance (the reference for FD);
- ``dp-lora4``: centralized DP-SGD at ε = 10 from the base with rank-4 LoRA + class embedding,
  bench/privacy.py's best recipe otherwise (batch 512 × 260 steps, lr 3e-3, C = 0.005).

Rows are keyed (row, seed) and written as each finishes (bench/results/lora/lora.{json,md}).

    .venv/bin/python bench/lora.py --rows scratch,full-ft,lora4-fedavg,lora4-ffa --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import TreeRss, run_missing, timed_fedsynth_run
from privacy import B512, PATH, public_model

FEDERATED = "configs/digits-federated-finetune.toml"
CENTRAL = "configs/digits-centralized.toml"
RANKS, AGGREGATIONS = (1, 4, 16), ("fedavg", "ffa")
DP_SGD = ["privacy.max_grad_norm=0.005", 'privacy.mode="dp-sgd"', "privacy.target_epsilon=10"]
COLUMNS = (  # header, key, format
    ("MB / round", "mb_per_round", ".3f"),
    ("MB total", "mb_total", ".1f"),
    ("CAS", "cas_accuracy", ".1%"),
    ("label fidelity", "label_fidelity", ".2f"),
    ("FD", "fd", ".2f"),
    ("precision", "precision", ".2f"),
    ("recall", "recall", ".2f"),
    ("ε", "epsilon", ".2f"),
    ("wall s", "wall_s", ".0f"),
    ("peak RSS MB (process tree)", "peak_tree_rss_mb", ".0f"),
)


def _lora(rank: int, aggregation: str) -> list[str]:
    return [f"lora.rank={rank}", f'lora.aggregation="{aggregation}"', "train.trainable='class_embedding'"]


# name: (config, label, overrides, starts from the public base)
ROWS: dict[str, tuple[str, str, list[str], bool]] = {
    "scratch": (FEDERATED, "from scratch, every weight (the demo)", [], False),
    "full-ft": (FEDERATED, "from the base, every weight", [], True),
    "path": (FEDERATED, "from the base, the conditioning path", [f"train.trainable='{PATH}'"], True),
    **{
        f"lora{r}-{agg}": (
            FEDERATED,
            f"from the base, LoRA r = {r} ({agg}) + class embedding",
            _lora(r, agg),
            True,
        )
        for r in RANKS
        for agg in AGGREGATIONS
    },
    # the same 2,400 steps in one place, at the federation's lr and guidance: FD's reference
    # LoRA usually wants a larger step than full fine-tuning (the demo's lr 3e-4 is full training's)
    **{
        f"lora{r}-{agg}-lr{lr}": (
            FEDERATED,
            f"from the base, LoRA r = {r} ({agg}) + class embedding, lr {lr}",
            [*_lora(r, agg), f"train.lr={lr}"],
            True,
        )
        for r in RANKS
        for agg in AGGREGATIONS
        for lr in ("1e-3", "3e-3")
    },
    "central-ft": (
        CENTRAL,
        "centralized from the base, every weight (2,400 steps)",
        ["federation.rounds=30", "train.local_steps=20", "train.lr=3e-4", "sample.guidance=2.0"],
        True,
    ),
    "dp-lora4": (
        CENTRAL,
        "centralized DP-SGD ε = 10 from the base, LoRA r = 4 + class embedding (512 × 260, lr 3e-3, C 0.005)",
        [*B512, *_lora(4, "fedavg"), "train.lr=3e-3", *DP_SGD],
        True,
    ),
}
KEYS = ("cas_accuracy", "label_fidelity", "fd", "precision", "recall", "epsilon")


def run_row(name: str, seed: int, runs: Path, public_runs: Path) -> dict:
    config, label, overrides, from_base = ROWS[name]
    out = runs / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"seed={seed}", *overrides]
    if from_base:
        sets.append(f"model.init='{public_model(public_runs)}'")
    with TreeRss() as rss:
        wall, metrics = timed_fedsynth_run(config, out, sets, name)
    summary = json.loads((out / "summary.json").read_text())
    rounds = [m for m in metrics if m.get("phase") != "finetune"]
    per_round = sum(m["bytes_up"] + m["bytes_down"] for m in rounds) / max(1, len(rounds))
    return {
        "row": name,
        "seed": seed,
        "label": label,
        "mb_per_round": round(per_round / 1e6, 4),
        "mb_total": round((summary["bytes_up"] + summary["bytes_down"]) / 1e6, 3),
        **{k: summary.get(k) for k in KEYS},
        "train_wall_s": round(summary["train_wall_s"], 1),
        "wall_s": round(wall, 1),
        "peak_tree_rss_mb": round(rss.peak / 2**20),  # every process under this one, summed
        "run": str(out),
    }


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "# Fine-tuning a public base: every weight, a subset, or LoRA adapters",
        "",
        f"Command: `.venv/bin/python bench/lora.py` (federated rows: `{FEDERATED}`; base: bench/privacy.py's",
        "public Fashion-MNIST 16×16 model). MB per round: the federated rounds' payload both ways; total:",
        "every message, the fine-tuning uploads included. Peak RSS: every process of the run summed",
        '(sampled each second; "–": rows measured before it was recorded).',
        "",
        "| row | seed | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "| --- " * (len(COLUMNS) + 2) + "|",
    ]
    for r in sorted(rows, key=lambda r: (list(ROWS).index(r["row"]), r["seed"])):
        cells = [_fmt(r.get(key), spec) for _, key, spec in COLUMNS]
        lines.append(f"| {r['label']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-lora"))
    parser.add_argument("--public-runs-dir", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    keys = [(n, int(s)) for n in names for s in args.seeds.split(",")]
    run_missing(
        "lora",
        keys,
        lambda r: (r["row"], r["seed"]),
        lambda name, seed: run_row(name, seed, args.runs_dir, args.public_runs_dir),
        table,
        rerun=args.rerun,
    )


if __name__ == "__main__":
    main()

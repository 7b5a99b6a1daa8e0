"""The quality-communication frontier of federated training at fixed compute.

Every federated row spends 2,400 client optimizer steps (4 clients per round): 15 rounds ×
40 local steps, 30 × 20 (the demo), 60 × 10 or 120 × 5. A method is a list of config
overrides on top of the demo's federation (``configs/digits-federated.toml``); a setting is the
partition (class-disjoint digits, Senden 2025's: 8 clients; Dirichlet α = 0.1: 10 clients).
Centralized rows train one model with the same total compute (2,400 steps) or the same
sequential steps (rounds × local steps = 600). A fine-tuning method (``…-ft<steps>``:
``federation.finetune_steps``) spends <steps> on every client after the last round; its rounds
get the rest of the 2,400 steps (8 clients × 100 fine-tuning steps → 20 rounds × 20).

Rows are keyed (setting, method, rounds, seed); a row already in the results is kept, so an
interrupted benchmark goes on where it stopped and new methods add rows. Results:
bench/results/quality/quality.{json,md} and quality.png (CAS and label fidelity against MB sent).

    .venv/bin/python bench/quality.py --settings disjoint --methods fedavgm,fedexp \
        --rounds 30 --seeds 0 [--runs-dir runs/bench-quality] [--rerun]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np

from _common import result_file, run_missing, timed_fedsynth_run

CONFIG = "configs/digits-federated.toml"
CLIENT_STEPS = 2400
SETTINGS = {
    "disjoint": [],
    "dirichlet": ['partition.scheme="dirichlet"', "partition.alpha=0.1", "partition.num_clients=10"],
}
METHODS = {
    "fedavg": ['strategy.name="fedavg"'],
    "fedavgm": ['strategy.name="fedavgm"'],  # the demo
    "fedavgm-keepopt": ['strategy.name="fedavgm"', "train.keep_optimizer=true"],
    "fedavgm-w1": ['strategy.name="fedavgm"', "sample.guidance=1.0"],
    "fedavgm-classaware": ['strategy.name="fedavgm"', "strategy.class_aware=true"],
    "fedexp": ['strategy.name="fedexp"'],
    "fedexp-keepopt": ['strategy.name="fedexp"', "train.keep_optimizer=true"],
    "fedavg-lr2": [
        'strategy.name="fedavgm"',
        "strategy.fedavgm.server_momentum=0.0",
        "strategy.fedavgm.server_learning_rate=2.0",
    ],
    "scaffold-sgd": ['strategy.name="scaffold"', 'train.optimizer="sgd"', "train.lr=0.05"],
    "fedavg-sgd": ['strategy.name="fedavg"', 'train.optimizer="sgd"', "train.lr=0.05"],
    "fedprox": ['strategy.name="fedprox"'],
    "fedavgm-lr3e-4": ['strategy.name="fedavgm"', "train.lr=3e-4"],
    "fedavgm-lr1e-4": ['strategy.name="fedavgm"', "train.lr=1e-4"],
    "fedexp-lr3e-4": ['strategy.name="fedexp"', "train.lr=3e-4"],
    # a shorter client trajectory (less drift) scaled back up by the server step
    "fedavgm-lr1e-4-slr3": [
        'strategy.name="fedavgm"',
        "train.lr=1e-4",
        "strategy.fedavgm.server_learning_rate=3.0",
    ],
    "fedavgm-lr1.5e-4-slr2": [
        'strategy.name="fedavgm"',
        "train.lr=1.5e-4",
        "strategy.fedavgm.server_learning_rate=2.0",
    ],
    **{
        f"fedadam-eta{eta}": [
            'strategy.name="fedadam"',
            f"strategy.fedopt.eta={eta}",
            "strategy.fedopt.tau=1e-3",
        ]
        for eta in ("1e-3", "3e-3", "1e-2")
    },
    **{
        f"fedyogi-eta{eta}": [
            'strategy.name="fedyogi"',
            f"strategy.fedopt.eta={eta}",
            "strategy.fedopt.tau=1e-3",
        ]
        for eta in ("1e-3", "3e-3", "1e-2")
    },
    **{
        f"fedadagrad-eta{eta}": [
            'strategy.name="fedadagrad"',
            f"strategy.fedopt.eta={eta}",
            "strategy.fedopt.tau=1e-3",
        ]
        for eta in ("1e-3", "3e-3", "1e-2")
    },
    # the FedOpt family at the demo's client lr (Reddi et al. 2021's grid, η ∈ {1e-3, 1e-2, 1e-1})
    **{
        f"{opt}-lr3e-4-eta{eta}": [f'strategy.name="{opt}"', "train.lr=3e-4", f"strategy.fedopt.eta={eta}"]
        for opt in ("fedadam", "fedyogi", "fedadagrad")
        for eta in ("1e-3", "1e-2", "1e-1")
    },
    **{
        f"{name}-sgd-lr{lr}": [f'strategy.name="{name}"', 'train.optimizer="sgd"', f"train.lr={lr}"]
        for name in ("scaffold", "fedavg")
        for lr in ("0.2", "0.5")
    },
    "fedavg-lr3e-4-ft100": ['strategy.name="fedavg"', "train.lr=3e-4", "federation.finetune_steps=100"],
    "fedavgm-lr3e-4-ft100-w1": [
        'strategy.name="fedavgm"',
        "train.lr=3e-4",
        "federation.finetune_steps=100",
        "sample.guidance=1.0",
    ],
    **{
        f"fedavgm-lr3e-4-ft{ft}": [
            'strategy.name="fedavgm"',
            "train.lr=3e-4",
            f"federation.finetune_steps={ft}",
        ]
        for ft in (50, 100, 200)
    },
    # the fine-tuned models uploaded as the EMA of their fine-tuning steps (local.ema_decay)
    **{
        f"fedavgm-lr3e-4-ft100-ema{d}": [
            'strategy.name="fedavgm"',
            "train.lr=3e-4",
            "federation.finetune_steps=100",
            f"local.ema_decay={d}",
        ]
        for d in ("0.9", "0.97")
    },
    # centralized at its own best guidance (w = 1, docs/results/guidance.md)
    "centralized-equal-compute": ['paradigm="centralized"', "sample.guidance=1.0"],
    "centralized-equal-sequential": ['paradigm="centralized"', "sample.guidance=1.0"],
}
KEYS = ("cas_accuracy", "label_fidelity", "fd", "precision", "recall", "class_tv_from_uniform")


def finetune_steps(method: str) -> int:
    """Steps each client fine-tunes after the last round (methods ``…-ft<steps>``)."""
    found = re.search(r"-ft(\d+)", method)
    return int(found.group(1)) if found else 0


def num_clients(setting: str) -> int:
    return 10 if setting == "dirichlet" else 8


def local_steps_of(setting: str, method: str, rounds: int) -> int:
    """Local steps per round so that the row spends CLIENT_STEPS in all: a fine-tuning
    method's rounds get what the fine-tuning (every client, ``-ft<steps>`` each) leaves."""
    return (CLIENT_STEPS - num_clients(setting) * finetune_steps(method)) // (4 * rounds)


def overrides(setting: str, method: str, rounds: int, seed: int) -> list[str]:
    """The ``--set`` values of one row: setting, method and the rounds × local steps split."""
    local_steps = local_steps_of(setting, method, rounds)
    # a centralized round does clients_per_round × local_steps steps: 4 gives the federated
    # row's total compute, 1 its sequential steps (rounds × local steps)
    per_round = 1 if method == "centralized-equal-sequential" else 4
    return [
        f"seed={seed}",
        *SETTINGS[setting],
        "train.lr=1e-3",  # every method's client lr unless it sets its own (the demo config's may differ)
        *METHODS[method],
        f"federation.rounds={rounds}",
        f"train.local_steps={local_steps}",
        f"federation.clients_per_round={per_round}",
        f"federation.min_clients={min(per_round, 2)}",
        f"federation.checkpoint_every={rounds}",
    ]


def run_row(setting: str, method: str, rounds: int, seed: int, runs: Path) -> dict:
    out = runs / setting / f"{method}-r{rounds}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    wall, lines = timed_fedsynth_run(CONFIG, out, overrides(setting, method, rounds, seed), method)
    summary = json.loads((out / "summary.json").read_text())
    mb = sum(line.get("bytes_up", 0) + line.get("bytes_down", 0) for line in lines) / 1e6
    return {
        "setting": setting,
        "method": method,
        "rounds": rounds,
        "local_steps": local_steps_of(setting, method, rounds),
        "finetune_steps": finetune_steps(method),
        "seed": seed,
        **{k: summary.get(k) for k in KEYS},
        "mb_exchanged": round(mb, 1),
        "wall_s": round(wall, 1),
        "run": str(out),
    }


def _ft(row: dict) -> str:
    return f" + {row['finetune_steps']} fine-tuning" if row.get("finetune_steps") else ""


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | method | rounds × local steps | seed | CAS | label fidelity | FD | precision "
        "| recall | class TV | MB up + down | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["setting"], r["method"], r["rounds"], r["seed"])):
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['rounds']} × {r['local_steps']}{_ft(r)} | {r['seed']} | "
            f"{fmt(r['cas_accuracy'], '.1f', 100)}% | {fmt(r['label_fidelity'], '.2f')} | "
            f"{fmt(r['fd'], '.2f')} | {fmt(r['precision'], '.2f')} | {fmt(r['recall'], '.2f')} | "
            f"{fmt(r['class_tv_from_uniform'], '.3f')} | {r['mb_exchanged']:.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["setting"], r["method"]) for r in rows})
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(series), 2)))
    for (setting, method), color in zip(series, colors, strict=True):
        pts = sorted(
            (r["mb_exchanged"], r["cas_accuracy"], r["label_fidelity"])
            for r in rows
            if r["setting"] == setting and r["method"] == method
        )
        xs = [max(p[0], 1.0) for p in pts]
        # squares: Dirichlet; stars: federated pre-training + local fine-tuning
        marker = "s" if setting == "dirichlet" else "*" if finetune_steps(method) else "o"
        style = {"marker": marker, "color": color, "markersize": 9 if marker == "*" else 6}
        axes[0].plot(xs, [p[1] for p in pts], label=f"{setting}: {method}", **style)
        axes[1].plot(xs, [p[2] for p in pts], **style)
    for ax, name in zip(axes, ("CAS accuracy", "label fidelity"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("MB exchanged (log; centralized drawn at 1)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(result_file("quality", ".png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


HEADER = (
    "# Quality vs communication at fixed compute (`bench/quality.py`)\n\n"
    "The demo's federation (`configs/digits-federated.toml`: digits 16×16, small UNet, AdamW with client "
    "lr 1e-3 unless the method names another (`-lr…`), server EMA 0.8, DDIM-25, guidance 2 "
    "unless the method says w1) with 2,400 client optimizer steps, 4 clients per round. "
    "`disjoint`: 8 class-disjoint clients (Senden 2025's setting); `dirichlet`: 10 clients, "
    "α = 0.1. Centralized rows: `equal-compute` 2,400 steps, `equal-sequential` rounds × local "
    "steps. `-ft<s>`: after the last round every client fine-tunes for s steps (taken from the "
    "2,400) and the synthetic set is the per-class mixture of the fine-tuned models. "
    "Wall times are measured on a shared 2-core machine and are not comparable between "
    "rows.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default="disjoint")
    p.add_argument("--methods", default="fedavgm")
    p.add_argument("--rounds", default="30")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-quality"))
    p.add_argument("--rerun", action="store_true", help="replace rows already in the results")
    args = p.parse_args()

    def render(rows: list[dict]) -> str:
        plot(rows)
        return HEADER + table(rows)

    keys = itertools.product(
        args.settings.split(","), args.methods.split(","), map(int, args.rounds.split(",")),
        map(int, args.seeds.split(",")),
    )  # fmt: skip
    run_missing(
        "quality", keys, lambda r: (r["setting"], r["method"], r["rounds"], r["seed"]),
        lambda *key: run_row(*key, args.runs_dir), render,
        payload=lambda rows: {"config": CONFIG, "client_steps": CLIENT_STEPS}, rerun=args.rerun,
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""CAS against the size of the synthetic set, beside the same protocol on as many real images.

CAS trains a fresh classifier on the synthetic set only; its accuracy depends on the set's size
as much as on the generator. For each trained run and each images-per-class count, this bench
samples a new set with the run's own sampler settings (``fedsynth sample``), judges it in a copy
of the run directory (``fedsynth evaluate``) and records CAS next to ``cas_real_accuracy`` —
the same classifier, epochs and seed trained on real training images with the synthetic set's
class counts. CAS below that is the generator's gap; that below the full-data classifier is the
set size's. Rows are kept as they finish. Results: bench/results/cas_size/cas_size.{json,md}.

    .venv/bin/python bench/cas_size.py [--runs runs/bench-fashion/centralized-s0,...] [--per-class 100,600]
        [--guidance 1,2] [--steps 10]

``--guidance`` and ``--steps`` sample with these classifier-free guidance weights and sampler
step counts instead of the run's own (``sample.guidance``, ``sample.steps``); rows are keyed
(run, images per class, guidance, steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import FEDSYNTH, run_missing, timed_command
from fedsynth.config import load_config

RUNS = "runs/bench-fashion/centralized-s0,runs/bench-fashion/fedavgm-s0"
KEYS = ("fd", "precision", "recall", "label_fidelity", "cas_accuracy", "cas_f1", "cas_real_accuracy")


def fedsynth(*args: str) -> float:
    """``fedsynth ARGS`` (a one-line exit on failure); its wall seconds."""
    return timed_command([FEDSYNTH, *args], f"fedsynth {args[0]}")


def own_sampling(run: str) -> tuple[float, int]:
    s = load_config(Path(run) / "config.toml").sample
    return s.guidance, s.steps


def row_key(r: dict) -> tuple:
    return r["run"], r["per_class"], r.get("guidance", 1.0), r["steps"]


def run_row(run: str, per_class: int, w: float, steps: int, out_dir: Path) -> dict:
    """One row: ``run``'s model sampled at ``per_class`` images per class, guidance ``w`` and
    ``steps`` sampler steps."""
    source = Path(run)
    s = load_config(source / "config.toml").sample
    suffix = ("" if w == s.guidance else f"-w{w:g}") + ("" if steps == s.steps else f"-s{steps}")
    copy = out_dir / f"{source.name}-pc{per_class}{suffix}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("checkpoints", "synthetic", "eval.json"))
    sample_s = fedsynth(
        "sample", str(copy), "--out", str(copy / "synthetic"), "--per-class", str(per_class),
        "--sampler", s.sampler, "--steps", str(steps), "--guidance", str(w), "--seed", "0",
    )  # fmt: skip
    eval_s = fedsynth("evaluate", str(copy))
    judged = json.loads((copy / "eval.json").read_text())
    return {
        "run": run,
        "per_class": per_class,
        "guidance": w,
        "steps": steps,
        "num_synthetic": judged["num_synthetic"],
        "cas_real_size": judged["cas_real_size"],
        "real_accuracy": judged["real_accuracy"],
        **{k: judged[k] for k in KEYS},
        "sample_s": round(sample_s, 1),
        "eval_s": round(eval_s, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "# CAS against the synthetic set's size (`bench/cas_size.py`)\n",
        "Each trained run sampled again with its own sampler (guidance `w` and DDIM steps: the run's "
        "own unless the row says otherwise) at each size and judged on "
        "the real test split. `CAS real` is the same classifier protocol (CNN, epochs, seed) "
        "trained on as many real training images with the same class counts; `full real` is the "
        "domain classifier trained on the whole real training split.\n",
        "| run | images / class | w | sampler steps | images | CAS | CAS F1 | CAS real (same size) "
        "| full real | FD ↓ | precision | recall | label fidelity | sample s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=row_key):
        lines.append(
            f"| {Path(r['run']).name} | {r['per_class']} | {r.get('guidance', 1.0):g} | {r['steps']} | "
            f"{r['num_synthetic']} | "
            f"{r['cas_accuracy']:.1%} | {r['cas_f1']:.1%} | {r['cas_real_accuracy']:.1%} | "
            f"{r['real_accuracy']:.1%} | {r['fd']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
            f"{r['label_fidelity']:.2f} | {r['sample_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default=RUNS)
    p.add_argument("--per-class", default="100,600")
    p.add_argument("--guidance", default="", help="guidance weights (default: each run's own)")
    p.add_argument("--steps", default="", help="sampler step counts (default: each run's own)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/bench-cas-size"))
    args = p.parse_args()
    weights = [float(w) for w in args.guidance.split(",") if w] or [None]
    step_counts = [int(n) for n in args.steps.split(",") if n] or [None]
    keys = []
    for run in args.runs.split(","):
        own_w, own_steps = own_sampling(run)
        keys += [
            (run, int(n), own_w if w is None else w, own_steps if k is None else k)
            for n in args.per_class.split(",")
            for w in weights
            for k in step_counts
        ]
    run_missing(
        "cas_size", keys, row_key,
        lambda run, n, w, k: run_row(run, n, w, k, args.out_dir), table,
    )  # fmt: skip


if __name__ == "__main__":
    main()

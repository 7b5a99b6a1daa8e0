"""``report.md``: what a person reads — summary table, sample grid, curves, partitions."""

from __future__ import annotations

import json

from fedsynth.report.plots import plot_curve
from fedsynth.rundir import RunDir, read_json

SUMMARY_ROWS = (
    ("paradigm", "paradigm", "{}"),
    ("strategy", "strategy", "{}"),
    ("rounds", "rounds", "{}"),
    ("wall time (s)", "wall_s", "{:.1f}"),
    ("bytes up", "bytes_up", "{:,}"),
    ("bytes down", "bytes_down", "{:,}"),
    ("FD ↓", "fd", "{:.2f}"),
    ("precision ↑", "precision", "{:.3f}"),
    ("recall ↑", "recall", "{:.3f}"),
    ("CAS accuracy ↑", "cas_accuracy", "{:.2%}"),
    ("CAS F1 ↑", "cas_f1", "{:.2%}"),
    ("real-data classifier accuracy", "real_accuracy", "{:.2%}"),
)


def _fmt(fmt: str, value) -> str:
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def write_report(run: RunDir) -> str:
    summary = read_json(run.summary) if run.summary.is_file() else {}
    lines = [f"# fedsynth run report: `{run.root.name}`", "", "| metric | value |", "| --- | --- |"]
    lines += [
        f"| {label} | {_fmt(fmt, summary[key])} |" for label, key, fmt in SUMMARY_ROWS if key in summary
    ]
    if (run.root / "samples.png").is_file():
        lines += ["", "## Samples (one row per class)", "", "![samples](samples.png)"]
    metrics = run.read_metrics()
    if metrics:
        rounds = [m["round"] for m in metrics]
        plot_curve(
            rounds,
            {"train loss": [m["train_loss"] for m in metrics]},
            "round",
            "diffusion loss",
            run.root / "loss.png",
            "training loss per round",
        )
        lines += ["", "## Training", "", "![loss](loss.png)"]
    if run.eval.is_file():
        ev = read_json(run.eval)
        lines += [
            "",
            "## Evaluation",
            "",
            f"Features: {ev.get('feature_extractor', '?')}.",
            "",
            "Class distribution of generated samples (as judged by the real-data classifier):",
            "",
            "```",
            json.dumps(ev.get("class_distribution", {})),
            "```",
        ]
    if (run.root / "partitions.png").is_file():
        lines += ["", "## Data partitions", "", "![partitions](partitions.png)"]
    text = "\n".join(lines) + "\n"
    run.report.write_text(text)
    return text

"""``fedsynth compare``: one row per run in Senden 2025's Table 2 layout, plus a bar chart."""

from __future__ import annotations

from pathlib import Path

from fedsynth.core.errors import RunDirError
from fedsynth.core.rundir import RunDir, read_json
from fedsynth.report.plots import plot_bars

COLUMNS = (
    # the question a federation asks: how good is the downstream classifier on real test data
    # — trained on the synthetic set (CAS, task diffusion) or federatedly itself (task classifier)
    ("classifier on real test ↑", "downstream", "{:.2%}"),
    ("IS ↑", "is_mean", "{:.2f}"),
    ("FD ↓", "fd", "{:.3f}"),
    ("CAS accuracy ↑", "cas_accuracy", "{:.2%}"),
    ("CAS precision ↑", "cas_precision", "{:.2%}"),
    ("CAS recall ↑", "cas_recall", "{:.2%}"),
    ("CAS F1 ↑", "cas_f1", "{:.2%}"),
    ("precision ↑", "precision", "{:.3f}"),
    ("recall ↑", "recall", "{:.3f}"),
    ("wall s", "wall_s", "{:.0f}"),
    ("MB up + down", "mb", "{:.1f}"),
)


def _cell(fmt: str, value) -> str:
    return "–" if value is None else fmt.format(value)


def comparison_table(rows: dict[str, dict]) -> str:
    """Markdown table; ``rows`` maps a run name to its summary (or ``{"error": ...}``)."""
    lines = ["| run | " + " | ".join(c[0] for c in COLUMNS) + " |", "| --- " * (len(COLUMNS) + 1) + "|"]
    for name, s in rows.items():
        if "error" in s:
            lines.append(f"| {name} | error: {s['error']} |" + " |" * (len(COLUMNS) - 1))
            continue
        downstream = s.get("test_accuracy", s.get("cas_accuracy"))
        s = {**s, "downstream": downstream, "mb": (s.get("bytes_up", 0) + s.get("bytes_down", 0)) / 1e6}
        lines.append(f"| {name} | " + " | ".join(_cell(f, s.get(k)) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def run_label(summary: dict, root: Path) -> str:
    kind = summary.get("strategy") if summary.get("paradigm") == "federated" else summary.get("paradigm")
    task = ", federated classifier" if summary.get("task") == "classifier" else ""
    return f"{root.name} ({kind}{task})"


def write_comparison(run_dirs: list[Path], out: Path) -> str:
    if out.is_dir():
        raise RunDirError(
            f"--out {out} is a folder: give the markdown file to write, e.g. {out / 'compare.md'}"
        )
    if not out.parent.is_dir():
        raise RunDirError(f"--out {out}: its folder {out.parent} does not exist")
    rows: dict[str, dict] = {}
    for root in run_dirs:
        run = RunDir(Path(root))
        if not run.summary.is_file():
            raise RunDirError(f"{run.root} has no summary.json (not a finished run)")
        summary = read_json(run.summary)
        rows[run_label(summary, run.root)] = summary
    chart = out.with_suffix(".png")
    evaluated = {k: v for k, v in rows.items() if "cas_accuracy" in v}
    if evaluated:
        plot_bars(
            list(evaluated),
            {
                "CAS accuracy": [v["cas_accuracy"] for v in evaluated.values()],
                "CAS F1": [v["cas_f1"] for v in evaluated.values()],
            },
            "score",
            chart,
            "downstream classifier trained on synthetic data",
        )
    text = "\n".join(
        [
            "# Comparison",
            "",
            comparison_table(rows),
            "",
            f"![comparison]({chart.name})" if evaluated else "",
            "",
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text

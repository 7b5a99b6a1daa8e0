"""Memory of `fedsynth sample` against the size of the synthetic set: the peak resident memory of
the sampling process at 2,000 to 200,000 images, as PNGs and as `synthetic.npz`. A set is
generated and written batch by batch, so the peak should not grow with the set.

    .venv/bin/python bench/sample_memory.py [--run RUN] [--rerun]

Without ``--run`` a tiny centralized digits run (16 px, tiny UNet) is trained first, in a
temporary folder; every row samples from it with DDIM-2 (the network is cheap so that the
writer's memory is what is measured).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import FEDSYNTH, TreeRss, fedsynth_run, run_missing

NAME = "sample_memory"
SIZES = [("npz", 200), ("npz", 2000), ("npz", 20000), ("png", 200), ("png", 2000)]
TINY_RUN = [
    "model.preset=tiny",
    "federation.rounds=2",
    "train.local_steps=5",
    "train.batch_size=16",
    "diffusion.num_train_timesteps=50",
    "sample.per_class=3",
    "sample.steps=2",
    "eval.enabled=false",
]


def sample_row(run: Path, fmt: str, per_class: int) -> dict:
    """One `fedsynth sample` in a fresh process: its peak tree RSS, wall time and output size."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set"
        cmd = [FEDSYNTH, "sample", str(run), "--out", str(out), "--per-class", str(per_class), "--steps", "2"]
        start = time.perf_counter()
        with TreeRss(every=0.2) as rss:
            res = subprocess.run([*cmd, "--format", fmt], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"sample {fmt} {per_class} failed: {res.stderr.strip().splitlines()[-3:]}")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "format": fmt,
        "per_class": per_class,
        "images": per_class * 10,
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "wall_s": round(wall, 1),
        "output_mb": round(size / 2**20, 1),
    }


def render(rows: list[dict]) -> str:
    lines = [
        "# Memory of `fedsynth sample` against the set's size (`bench/sample_memory.py`)",
        "",
        "Tiny digits model (16 px), DDIM-2, batch 250; peak resident memory of the sampling process "
        "(sampled every 0.2 s from /proc); wall time includes starting the process and its imports "
        "(about 5 s).",
        "",
        "| format | images | peak RSS MB | wall s | output MB |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["format"], r["images"])):
        cells = [r["format"], f"{r['images']:,}", r["peak_rss_mb"], r["wall_s"], r["output_mb"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run directory (default: train a tiny one)")
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args()
    tmp = None
    run = args.run
    if run is None:
        tmp = Path(tempfile.mkdtemp(prefix="fedsynth-sample-memory-"))
        run = tmp / "run"
        res = fedsynth_run("configs/digits-centralized.toml", run, TINY_RUN)
        if res.returncode != 0:
            raise SystemExit(f"tiny run failed: {res.stderr.strip().splitlines()[-3:]}")
    try:
        run_missing(
            NAME,
            SIZES,
            lambda r: (r["format"], r["per_class"]),
            lambda fmt, n: sample_row(run, fmt, n),
            render,
            payload=lambda rows: {"sampler": "ddim", "steps": 2, "batch_size": 250},
            rerun=args.rerun,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

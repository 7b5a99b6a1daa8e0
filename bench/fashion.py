"""Fashion-MNIST (60,000 training images, the official 10,000-image test split): centralized
vs federated at equal compute (2,000 optimizer steps), with the memory of the whole process
tree (the simulation's Ray workers included) sampled every second.

Configs: ``configs/fashion-centralized.toml`` and ``configs/fashion-federated.toml``
(Dirichlet α = 0.3, 10 clients, 5 per round); a method's overrides go on top of the
federated one. Needs the dataset (``make install`` puts it in .venv/data/fashion-mnist).
Results: bench/results/fashion/fashion.{json,md}; rows are kept as they finish.

    .venv/bin/python bench/fashion.py [--methods centralized,fedavgm,fedavg] [--seeds 0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import tomli_w

from _common import FEDSYNTH, ROOT, load_rows, result_file, run_command, run_missing, write_result
from fedsynth.config import load_config

METHODS = {
    # the federated rows' compute and sampling (2,000 steps, 100 per class, DDIM-25)
    "centralized": (
        "configs/fashion-centralized.toml",
        ["federation.rounds=20", "sample.per_class=100", "sample.steps=25"],
    ),
    # the config as it is: its 30-minute budget (2,500 steps, 1,500 per class, DDIM-10)
    "centralized-30min": ("configs/fashion-centralized.toml", []),
    "fedavgm": ("configs/fashion-federated.toml", []),
    "fedavg": ("configs/fashion-federated.toml", ['strategy.name="fedavg"']),
    "fedexp": ("configs/fashion-federated.toml", ['strategy.name="fedexp"']),
    # the digits remedies (bench/results/quality/quality.md): client lr 3e-4; federated pre-training then
    # 50 local fine-tuning steps per client (10 × 50 of the 2,000 steps: 30 rounds × 5 × 10)
    "fedavgm-lr3e-4": ("configs/fashion-federated.toml", ["train.lr=3e-4"]),
    "fedavgm-lr3e-4-ft50": (
        "configs/fashion-federated.toml",
        ["train.lr=3e-4", "federation.rounds=30", "federation.finetune_steps=50"],
    ),
    "fedavgm-8clients": (
        "configs/fashion-federated.toml",
        ["partition.num_clients=8", "federation.clients_per_round=4"],
    ),
}
KEYS = (
    "fd",
    "precision",
    "recall",
    "cas_accuracy",
    "cas_f1",
    "label_fidelity",
    "class_tv_from_uniform",
    "near_copy_fraction",
    "real_accuracy",
    "train_wall_s",
    "mia_auc",
)


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def role(pid: int, root: int) -> str:
    """driver (the fedsynth process), worker (a Ray worker: it runs the simulated clients) or
    ray (Ray's own services: raylet, GCS, dashboard, monitors)."""
    if pid == root:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    return "worker" if cmd.startswith("ray::") or "default_worker.py" in cmd else "ray"


def kb_field(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def tree_memory_mb(root: int) -> dict[str, float]:
    """Memory of the process tree in MB: ``rss`` (resident, shared pages counted in every
    process), ``pss`` (proportional: shared pages split between their processes, so the
    parts add up), and the PSS of each role and of the largest worker."""
    out = {"rss": 0.0, "pss": 0.0, "driver": 0.0, "worker": 0.0, "ray": 0.0, "largest worker": 0.0}
    for pid in process_tree(root):
        try:
            rss = kb_field(Path(f"/proc/{pid}/status"), "VmRSS:") / 1024
            pss = kb_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss:") / 1024
        except OSError:
            continue
        kind = role(pid, root)
        out["rss"] += rss
        out["pss"] += pss
        out[kind] += pss
        if kind == "worker":
            out["largest worker"] = max(out["largest worker"], pss)
    return out


def run_row(method: str, seed: int, runs: Path) -> dict:
    config, sets = METHODS[method]
    out = runs / f"{method}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = run_command(config, out, [f"seed={seed}", *sets])
    start, peak = time.perf_counter(), {}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def poll() -> None:  # each quantity's own peak over the run, sampled every second
        while proc.poll() is None:
            for k, v in tree_memory_mb(proc.pid).items():
                peak[k] = max(peak.get(k, 0.0), v)
            time.sleep(1.0)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed: {err.strip().splitlines()[-3:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "method": method,
        "seed": seed,
        **{k: summary.get(k) for k in KEYS},
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak["rss"]),
        "peak_pss_mb": {k: round(v) for k, v in peak.items() if k != "rss"},
        "run": str(out),
    }


def rejudge(row: dict) -> dict:
    """Judge a row's run again with the domain classifier its config now asks for
    (``eval.classifier_epochs`` of the row's config file): ``fedsynth evaluate`` on the kept
    run directory, after setting that key in the run's ``config.toml``."""
    config, _ = METHODS[row["method"]]
    epochs = load_config(ROOT / config).eval.classifier_epochs
    run = Path(row["run"])
    saved = tomllib.loads((run / "config.toml").read_text())
    saved.setdefault("eval", {})["classifier_epochs"] = epochs
    (run / "config.toml").write_text(tomli_w.dumps(saved))
    subprocess.run([FEDSYNTH, "evaluate", str(run)], check=True, capture_output=True)
    summary = json.loads((run / "summary.json").read_text())
    return {**row, **{k: summary.get(k) for k in KEYS if k != "train_wall_s"}, "judge_epochs": epochs}


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(scale * value, spec)


def pss(row: dict) -> str:
    m = row.get("peak_pss_mb")  # rows measured before the breakdown have only RSS
    if not m:
        return "–"
    return f"{m['pss']} / {m['driver']} / {m['worker']} ({m['largest worker']}) / {m['ray']}"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | seed | FD ↓ | precision | recall | CAS | CAS F1 | label fidelity | class TV "
        "| near-copies | train s | total s | peak RSS MB | peak PSS MB: total / driver / Ray workers "
        "(largest) / Ray services |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {fmt(r['fd'], '.2f')} | {fmt(r['precision'], '.2f')} | "
            f"{fmt(r['recall'], '.2f')} | {fmt(r['cas_accuracy'], '.1f', 100)}% | "
            f"{fmt(r['cas_f1'], '.1f', 100)}% | "
            f"{fmt(r['label_fidelity'], '.2f')} | {fmt(r['class_tv_from_uniform'], '.3f')} | "
            f"{fmt(r['near_copy_fraction'], '.1f', 100)}% | {fmt(r['train_wall_s'], '.0f')} | "
            f"{r['wall_s']:.0f} | "
            f"{r['peak_rss_mb']} | {pss(r)} |"
        )
    return "\n".join(lines) + "\n"


HEADER = (
    "# Fashion-MNIST: centralized vs federated (`bench/fashion.py`)\n\n"
    "28×28 gray, `small` UNet, 2,000 optimizer steps in every row (centralized: 20 rounds × 5 × 20 "
    "steps; federated: 40 rounds × 5 clients × 10 steps, Dirichlet α = 0.3 over 10 clients), "
    "DDIM-25, 100 images per class (except `centralized-30min`: the centralized config's own "
    "30-minute budget, 2,500 steps, 1,500 images per class, DDIM-10), judged on the official "
    "10,000-image test split by fedsynth's "
    "domain classifier (FD, precision/recall, label fidelity) and a CAS classifier trained on the "
    "synthetic set only. Peak RSS: the whole process tree (driver, Ray and its workers) sampled "
    "every second; RSS counts pages shared between processes (Ray's object store, libraries) in "
    "each of them, PSS splits them so that the parts add up (each part's own peak). "
    "Wall times on a 2-core CPU shared with other benchmarks.\n\n"
    "Anchors (not comparable: Inception FID, 60,000 synthetic images, other classifiers, GPU "
    "training): a classifier trained on real Fashion-MNIST scores ~90–93% (our domain classifier: "
    "`real_accuracy` below); DPDM (Dockhorn et al. 2023) reports FID 17.1 at ε = 10.\n\n"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="centralized,fedavgm")
    p.add_argument("--seeds", default="0")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-fashion"))
    p.add_argument(
        "--rejudge", action="store_true", help="re-evaluate the kept rows' runs with today's judge"
    )
    args = p.parse_args()

    def render(rows: list[dict]) -> str:
        real = next((r["real_accuracy"] for r in rows if r.get("real_accuracy")), None)
        note = f"Domain classifier on the real test split: {fmt(real, '.1f', 100)}%.\n\n" if real else ""
        return HEADER + note + table(rows)

    if args.rejudge:
        rows = [rejudge(r) if Path(r["run"]).is_dir() else r for r in load_rows("fashion")]
        write_result(
            "fashion", {"methods": {m: METHODS[m] for m in {r["method"] for r in rows}}, "rows": rows}
        )
        (result_file("fashion", ".md")).write_text(render(rows))
        return
    keys = itertools.product(args.methods.split(","), map(int, args.seeds.split(",")))
    run_missing(
        "fashion", keys, lambda r: (r["method"], r["seed"]), lambda *key: run_row(*key, args.runs_dir),
        render, payload=lambda rows: {"methods": {m: METHODS[m] for m in {r["method"] for r in rows}}},
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""Phoenix's setting at our scale: digits, 2 classes per client, 10 clients (5 per round),
FedAvg; default non-IID FedAvg vs Phoenix data sharing (β, α), personal layers +
threshold filtering, FedDDPM and FedDDPM+, plus IID federated and centralized with the
same optimizer steps. Results: bench/results/heterogeneity/heterogeneity.{json,md}.

    .venv/bin/python bench/heterogeneity.py [--rounds 10] [--local-steps 12] [--per-class 30]
        [--pretrain-steps 100] [--only fedavg,fedddpm] [--runs-dir runs/bench-heterogeneity]
        [--collect RUNS_DIR/STAMP] [--result heterogeneity]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import ROOT, fedsynth_run, result_file, write_result


def _share(beta: int, alpha: int) -> list[str]:
    return [f"phoenix.beta={beta}", f"phoenix.alpha={alpha}", "phoenix.warmup_steps=100"]


def _filter(mode: str) -> list[str]:
    return [
        'exchange.personal="last-block"',
        "phoenix.filter_from=3",
        f"phoenix.filter_mode={json.dumps(mode)}",
        "phoenix.precision_threshold=0.3",
    ]


CALIBRATION = ["calibration.aux_size=500", "calibration.server_steps=20"]
RUNS: dict[str, list[str]] = {
    "centralized": ['paradigm="centralized"'],
    "iid": ['partition.scheme="iid"'],
    "fedavg": [],
    "share b5 a100": _share(5, 100),
    "share b15 a100": _share(15, 100),
    "share b25 a100": _share(25, 100),
    "share b25 a25": _share(25, 25),
    "share b25 a50": _share(25, 50),
    "share b25 a75": _share(25, 75),
    "personal + lowest": _filter("lowest"),
    "personal + threshold": _filter("threshold"),
    "fedddpm": ['calibration.mode="always"', *CALIBRATION],
    "fedddpm+": ['calibration.mode="stall"', *CALIBRATION],
    "local mixture": ['paradigm="local"'],  # one-shot: each client alone, equal total compute
}
KEYS = (
    "fd",
    "precision",
    "recall",
    "cas_accuracy",
    "class_tv_from_uniform",
    "bytes_up",
    "bytes_down",
    "wall_s",
)


def base(args) -> list[str]:
    return [
        'partition.scheme="pathological"',
        "partition.classes_per_client=2",
        "partition.num_clients=10",
        "federation.clients_per_round=5",
        f"federation.rounds={args.rounds}",
        f"federation.checkpoint_every={args.rounds}",
        f"train.local_steps={args.local_steps}",
        'strategy.name="fedavg"',
        f"sample.per_class={args.per_class}",
        'sample.sampler="dpm"',
        "sample.steps=20",
        "eval.tsne_points=0",
        f"calibration.pretrain_steps={args.pretrain_steps}",
    ]


def collect(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    row = {k: summary.get(k) for k in KEYS}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row["extra_bytes"] = summary.get("pretrain_bytes_up", 0) + summary.get("pretrain_bytes_down", 0)
    row["server_s"] = (
        summary.get("warmup_s", 0.0)
        + summary.get("aux_build_s", 0.0)
        + sum(m.get("server_s", 0.0) for m in metrics)
    )
    row["corrections"] = sum(bool(m.get("calibrated")) for m in metrics)
    row["excluded"] = metrics[-1].get("filter_excluded", []) if metrics else []
    return row


def run_one(name: str, args, out: Path) -> dict:
    start = time.perf_counter()
    res = fedsynth_run("configs/digits-federated.toml", out, base(args) + RUNS[name])
    if res.returncode != 0:
        error = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": error, "wall_s": time.perf_counter() - start}
    return collect(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--pretrain-steps", type=int, default=100, help="FedDDPM's one-off local models")
    ap.add_argument("--only", default="")
    ap.add_argument("--runs-dir", default="runs/bench-heterogeneity")
    ap.add_argument("--collect", default="", help="rebuild the results from existing run directories")
    ap.add_argument("--result", default="heterogeneity", help="bench/results/heterogeneity/RESULT.{json,md}")
    ap.add_argument("--merge", action="store_true", help="add these rows to RESULT's (same settings)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    rows: dict[str, dict] = {}
    runs = Path(args.collect) if args.collect else ROOT / args.runs_dir / time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        out = runs / name.replace(" ", "_").replace("+", "plus")
        if args.collect:
            if (out / "summary.json").is_file():
                rows[name] = collect(out)
        else:
            rows[name] = run_one(name, args, out)
            print(name, rows[name], flush=True)
    settings = {
        "dataset": "digits 16x16",
        "partition": "pathological, 2 classes per client",
        "num_clients": 10,
        "clients_per_round": 5,
        "strategy": "fedavg",
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "optimizer_steps": args.rounds * 5 * args.local_steps,
        "preset": "small",
        "per_class": args.per_class,
        "sampler": "dpm-20",
        "fedddpm_pretrain_steps": args.pretrain_steps,
    }
    if args.merge:
        old = json.loads((result_file(args.result, ".json")).read_text())
        if old["settings"] != settings:
            raise SystemExit(
                f"--merge: {args.result}.json was measured with other settings: {old['settings']}"
            )
        rows = {**old["rows"], **rows}
    write_result(args.result, {"settings": settings, "rows": rows})
    render(settings, rows, args.result)


def _row(name: str, r: dict, gap: tuple[float, float] | None) -> str:
    if "error" in r:
        return f"| {name} | error: {r['error']} |" + " |" * 9
    closed = "–"
    if gap and gap[1] != gap[0]:
        closed = f"{(r['cas_accuracy'] - gap[0]) / (gap[1] - gap[0]):.0%}"
    return (
        f"| {name} | {r['fd']:.3f} | {r['precision']:.2f} | {r['recall']:.2f} | {r['cas_accuracy']:.1%} "
        f"| {closed} | {r['class_tv_from_uniform']:.3f} | {r['extra_bytes'] / 1e6:.1f} | {r['server_s']:.0f} "
        f"| {r['corrections']} | {(r['bytes_up'] + r['bytes_down']) / 1e6:.0f} |"
    )


def render(settings: dict, rows: dict[str, dict], result: str) -> None:
    ok = all(k in rows and "error" not in rows[k] for k in ("fedavg", "centralized"))
    gap = (rows["fedavg"]["cas_accuracy"], rows["centralized"]["cas_accuracy"]) if ok else None
    md = [
        "# Heterogeneous clients: Phoenix and FedDDPM (Phoenix's setting at our scale)",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()),
        "",
        "| run | FD ↓ | precision ↑ | recall ↑ | CAS ↑ | CAS gap closed | class TV from uniform ↓ "
        "| extra MB | server s | corrections | MB exchanged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[_row(name, r, gap) for name, r in rows.items()],
        "",
        "CAS gap closed = (CAS − CAS_fedavg) / (CAS_centralized − CAS_fedavg); goal ≥ 80% for the best "
        "method. Extra MB: FedDDPM's one-off local-model upload (and its download). Server s: warm-up on "
        "G, building the auxiliary set and calibration steps. Corrections: rounds in which the server "
        "calibrated the global model (FedDDPM: every round). Personal-layer rows are means over the "
        "clients' own models. Reproduce: `.venv/bin/python bench/heterogeneity.py "
        f"--rounds {settings['rounds']} --local-steps {settings['local_steps']} "
        f"--per-class {settings['per_class']} --pretrain-steps {settings['fedddpm_pretrain_steps']}"
        + ("" if result == "heterogeneity" else f" --result {result}")
        + "` (add `--only NAME,...` for a subset of rows).",
    ]
    (result_file(result, ".md")).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

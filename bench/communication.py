"""de Goede et al. 2024's communication experiment at our scale: digits, Dirichlet(0.5) label skew,
5 clients (all in every round), FedAvg, equal rounds; every exchange plan and codec.

For each run: total bytes up / down (serialized messages, initial broadcast included),
the reduction against ``full`` + ``fp32``, FD and CAS (mean over clients for the plans
that leave personal models). Results: bench/results/communication/communication.{json,md}.

    .venv/bin/python bench/communication.py [--rounds 15] [--local-steps 12] [--per-class 50]
        [--only full/fp32,udec/int8] [--runs-dir runs/bench-communication]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import ROOT, fedsynth_run, result_file, write_result

RUNS = (
    "full/fp32",
    "full/fp16",
    "full/bf16",
    "full/int8",
    "full/topk",
    "usplit/fp32",
    "usplit/int8",
    "udec/fp32",
    "udec/int8",
    "udec/topk",
    "ulatdec/fp32",
    "ulatdec/int8",
)
KEYS = ("fd", "precision", "recall", "cas_accuracy", "bytes_up", "bytes_down", "train_wall_s", "wall_s")


def overrides(plan: str, codec: str, args) -> list[str]:
    return [
        'partition.scheme="dirichlet"',
        "partition.alpha=0.5",
        "partition.num_clients=5",
        "partition.min_samples=10",
        "federation.clients_per_round=5",
        f"federation.rounds={args.rounds}",
        f"federation.checkpoint_every={args.rounds}",
        f"train.local_steps={args.local_steps}",
        'strategy.name="fedavg"',
        f"exchange.plan={json.dumps(plan)}",
        f"exchange.codec={json.dumps(codec)}",
        f"exchange.topk_ratio={args.topk_ratio}",
        f"sample.per_class={args.per_class}",
        'sample.sampler="dpm"',
        "sample.steps=20",
        "eval.tsne_points=0",
    ]


def run_one(name: str, args, out: Path) -> dict:
    """``name``: plan/codec, optionally @seed (e.g. full/fp32@1: the same run with seed 1)."""
    spec, _, seed = name.partition("@")
    plan, codec = spec.split("/")
    start = time.perf_counter()
    sets = overrides(plan, codec, args) + ([f"seed={int(seed)}"] if seed else [])
    res = fedsynth_run("configs/digits-federated.toml", out, sets)
    if res.returncode != 0:
        error = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": error, "wall_s": time.perf_counter() - start}
    return collect(out)


def collect(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    row = {k: summary.get(k) for k in KEYS}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row["params_up"] = sum(m["params_up"] for m in metrics)
    row["params_down"] = sum(m["params_down"] for m in metrics)
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    if "per_client" in ev:
        row["cas_per_client"] = {c: v["cas_accuracy"] for c, v in ev["per_client"].items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--topk-ratio", type=float, default=0.05)
    ap.add_argument("--only", default="")
    ap.add_argument("--runs-dir", default="runs/bench-communication")
    ap.add_argument("--collect", default="", help="rebuild the results from existing run directories")
    ap.add_argument("--merge", action="store_true", help="add these rows to the saved results")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    rows: dict[str, dict] = {}
    if args.collect:
        for name in names:
            out = Path(args.collect) / name.replace("/", "-").replace("@", "-seed")
            if (out / "summary.json").is_file():
                rows[name] = collect(out)
    else:
        runs = ROOT / args.runs_dir / time.strftime("%Y%m%d-%H%M%S")
        for name in names:
            rows[name] = run_one(name, args, runs / name.replace("/", "-").replace("@", "-seed"))
            print(name, rows[name], flush=True)
    settings = {
        "dataset": "digits 16x16",
        "partition": "dirichlet(0.5), min 10 per client",
        "num_clients": 5,
        "clients_per_round": 5,
        "strategy": "fedavg",
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "topk_ratio": args.topk_ratio,
        "preset": "small",
        "per_class": args.per_class,
        "sampler": "dpm-20",
    }
    if args.merge:
        rows = {**json.loads((result_file("communication", ".json")).read_text())["rows"], **rows}
    write_result("communication", {"settings": settings, "rows": rows})
    render(settings, rows)


def _row(name: str, r: dict, ref: dict) -> str:
    if "error" in r:
        return f"| {name} | error: {r['error']} | | | | | | |"
    total, ref_total = r["bytes_up"] + r["bytes_down"], ref["bytes_up"] + ref["bytes_down"]
    fd_rel = r["fd"] / ref["fd"] - 1
    cas_diff = 100 * (r["cas_accuracy"] - ref["cas_accuracy"])
    ok = total <= 0.1 * ref_total and fd_rel <= 0.10 and cas_diff >= -2.0
    return (
        f"| {name} | {r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {1 - total / ref_total:.1%} "
        f"| {r['fd']:.3f} ({fd_rel:+.0%}) | {r['cas_accuracy']:.1%} ({cas_diff:+.1f}) "
        f"| {r['precision']:.2f} / {r['recall']:.2f} | {'yes' if ok else 'no'} |"
    )


def _spread(rows: dict[str, dict]) -> list[str]:
    """The reference run repeated with another seed: how much FD / CAS move by chance alone."""
    a, b = rows["full/fp32"], rows.get("full/fp32@1")
    if not b or "error" in b:
        return []
    return [
        f"Run-to-run spread of the reference (seed 0 vs seed 1, same settings): FD {a['fd']:.3f} vs "
        f"{b['fd']:.3f} ({b['fd'] / a['fd'] - 1:+.0%}), CAS {a['cas_accuracy']:.1%} vs "
        f"{b['cas_accuracy']:.1%} ({100 * (b['cas_accuracy'] - a['cas_accuracy']):+.1f} points). "
        "Differences of this size between rows are noise, not the codec or plan.",
        "",
    ]


def render(settings: dict, rows: dict[str, dict]) -> None:
    ref = rows["full/fp32"]
    md = [
        "# Communication: exchange plans × codecs (de Goede et al. 2024's experiment at our scale)",
        "",
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()),
        "",
        "| plan / codec | MB up | MB down | fewer bytes than full/fp32 | FD ↓ (vs ref) "
        "| CAS ↑ (points vs ref) | precision / recall | goal met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[_row(name, r, ref) for name, r in rows.items()],
        "",
        *_spread(rows),
        "Goal: ≥ 90% fewer total bytes than full/fp32 with FD within 10% and CAS within 2 points. "
        "Bytes are the serialized message payloads (arrays + config), both directions, initial "
        "broadcast included; udec / ulatdec rows are means over the 5 clients' personal models "
        "(collecting those models for evaluation is not counted). FD is in the domain "
        "classifier's feature space. Reproduce: `.venv/bin/python bench/communication.py "
        f"--rounds {settings['rounds']} --local-steps {settings['local_steps']} "
        f"--per-class {settings['per_class']} --topk-ratio {settings['topk_ratio']}`.",
    ]
    (result_file("communication", ".md")).write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

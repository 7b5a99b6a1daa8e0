"""Senden 2025's Table 3 at our scale: time per round of the centralized baseline, centralized
FL (Flower simulation) and decentralized FL (contract + content store), same model and the
same optimizer steps per round, measured in one run, for each model preset; with bytes
moved, gas and transactions per round for the decentralized paradigm.

Settings follow Senden 2025: 8 trainers holding class-disjoint digits, 4 trainers per round,
every aggregator aggregates every round (8 by default). Steady state = median over the
rounds after the first (the first pays for worker start-up). Results:
bench/results/decentralized/decentralized.{json,md}.

    .venv/bin/python bench/decentralized.py [--rounds 6] [--local-steps 20] [--aggregators 8]
        [--presets tiny,small,base]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import result_file, timed_fedsynth_run, write_result

PARADIGMS = ("centralized", "federated", "decentralized")


def timed_run(paradigm: str, preset: str, args, out: Path) -> dict:
    sets = [
        f"paradigm={json.dumps(paradigm)}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"model.preset={json.dumps(preset)}",
        'strategy.name="fedavg"',
        f"ledger.aggregators={args.aggregators}",
        "sample.per_class=0",
        "eval.enabled=false",
        f"federation.checkpoint_every={args.rounds}",
    ]
    total, rounds = timed_fedsynth_run("configs/digits-federated.toml", out, sets, f"{paradigm}/{preset}")
    steady = rounds[1:]
    row = {
        "process_wall_s": total,
        "round_wall_s": [r["wall_s"] for r in rounds],
        "steady_round_s": statistics.median(r["wall_s"] for r in steady),
        "startup_s": total - sum(r["wall_s"] for r in rounds),
        "bytes_per_round": statistics.median(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in steady),
    }
    if paradigm == "decentralized":
        summary = json.loads((out / "summary.json").read_text())
        row.update(
            gas_per_round=statistics.median(r["gas"] for r in steady),
            transactions_per_round=statistics.median(r["transactions"] for r in steady),
            phase_s={k: statistics.median(r["phase_s"][k] for r in steady) for k in steady[0]["phase_s"]},
            aggregator_bytes_down_per_round=statistics.median(r["aggregator_bytes_down"] for r in steady),
            deploy_gas=summary["deploy_gas"],
            model_bytes=(out / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size,
        )
    return row


def table(results: dict) -> str:
    lines = [
        "| preset | paradigm | s per round | × centralized | × centralized FL | MB moved per round "
        "| gas per round | tx per round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for preset, rows in results.items():
        base, fl = rows["centralized"]["steady_round_s"], rows["federated"]["steady_round_s"]
        for paradigm in PARADIGMS:
            r = rows[paradigm]
            s = r["steady_round_s"]
            gas = f"{r['gas_per_round']:,.0f}" if "gas_per_round" in r else "–"
            tx = f"{r['transactions_per_round']:.0f}" if "transactions_per_round" in r else "–"
            lines.append(
                f"| {preset} | {paradigm} | {s:.2f} | {s / base:.2f} | {s / fl:.2f} "
                f"| {r['bytes_per_round'] / 1e6:.1f} | {gas} | {tx} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--aggregators", type=int, default=8)
    ap.add_argument("--presets", default="tiny,small,base")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            results[preset] = {p: timed_run(p, preset, args, Path(tmp) / f"{preset}-{p}") for p in PARADIGMS}
            print(table({preset: results[preset]}), flush=True)
    ratios = {
        preset: rows["decentralized"]["steady_round_s"] / rows["federated"]["steady_round_s"]
        for preset, rows in results.items()
    }
    settings = {
        "dataset": "digits 16x16, class_disjoint, 8 trainers",
        "clients_per_round": 4,
        "aggregators": args.aggregators,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "steps_per_round": 4 * args.local_steps,
        "strategy": "fedavg",
        "chain": "in-process (eth-tester + py-evm)",
        "store": "local directory",
    }
    write_result(
        "decentralized",
        {
            "settings": settings,
            "results": results,
            "decentralized_over_federated": ratios,
            "goal": "decentralized <= 1.5x centralized FL per round (Senden 2025: 5.61x)",
        },
    )
    text = (
        "# Decentralized vs centralized FL vs centralized (Senden 2025's Table 3 at our scale)\n\n"
        + "Settings: "
        + ", ".join(f"{k} = {v}" for k, v in settings.items())
        + "\n\n"
        + table(results)
        + "\n\nSenden 2025 (SD-1.5, 3.4 GB updates, 8 aggregators): centralized 74.1 s, "
        "centralized FL 110.9 s "
        "(1.50×), decentralized 621.8 s (8.39× centralized, 5.61× centralized FL). Goal: decentralized "
        "≤ 1.5× centralized FL per round. Reproduce: `.venv/bin/python bench/decentralized.py "
        f"--rounds {args.rounds} --local-steps {args.local_steps} --aggregators {args.aggregators}`.\n"
    )
    (result_file("decentralized", ".md")).write_text(text)


if __name__ == "__main__":
    main()

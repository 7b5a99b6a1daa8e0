"""Byzantine clients: which strategy to pick when not every data holder can be trusted.

8 clients holding IID digits, all 8 in every round; clients 0 and 1 are Byzantine and
send, every round, instead of their trained weights w (global weights g):
- ``sign-flip``: g − 4·(w − g) (their update reversed and scaled by 4);
- ``noise``: g + ε, ε ~ N(0, (4·rms(w − g))²) per coordinate (noise 4× an honest update).
FedAvg vs FedMedian, FedTrimmedAvg (β = 0.25: 2 of 8 cut per side), Krum and MultiKrum
(f = 2) and Bulyan (f = 1: Flower's Bulyan needs n ≥ 4f + 3, so f = 2 would need 11 clients
per round), each also run clean. The attack lives in this benchmark's ClientApp, not in
fedsynth. Results: bench/results/byzantine/byzantine.{json,md}.

    .venv/bin/python bench/byzantine.py [--rounds 20] [--local-steps 20] [--preset tiny]
        [--per-class 50] [--only fedavg,krum] [--attacks clean,sign-flip,noise] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from _common import ROOT, result_file, write_result
from fedsynth.client.app import handle_export, handle_query, handle_train
from fedsynth.config import load_config
from fedsynth.core.protocol import ARRAYS, CONFIG, PARTITION_ID, TASK_KEY
from fedsynth.core.records import numpy_record, record_numpy
from fedsynth.core.rundir import read_json
from fedsynth.pipeline import run_all

CONFIG_FILE = "configs/digits-federated.toml"
ATTACKERS = (0, 1)
SCALE = 4.0
STRATEGIES = {
    "fedavg": [],
    "fedmedian": [],
    "fedtrimmedavg": ["strategy.fedtrimmedavg.beta=0.25"],
    "krum": ["strategy.krum.num_malicious_nodes=2"],
    "multikrum": ["strategy.krum.num_malicious_nodes=2"],
    "bulyan": ["strategy.krum.num_malicious_nodes=1"],
}
KEYS = ("fd", "precision", "recall", "cas_accuracy")


def corrupt(kind: str, sent: dict[str, np.ndarray], trained: dict[str, np.ndarray], seed: int):
    """What a Byzantine client sends instead of ``trained`` (``sent``: the global weights)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, g in sent.items():
        delta = trained[k].astype(np.float64) - g
        if kind == "sign-flip":
            out[k] = g - SCALE * delta
        else:
            sigma = SCALE * float(np.sqrt(np.mean(delta**2)))
            out[k] = g + rng.normal(0.0, sigma, size=g.shape)
        out[k] = out[k].astype(trained[k].dtype)
    return out


def byzantine_app(kind: str) -> ClientApp:
    app = ClientApp()
    app.query()(handle_query)
    app.evaluate()(handle_export)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = record_numpy(msg.content[ARRAYS])
        reply = handle_train(msg, context)
        pid = int(context.node_config[PARTITION_ID])
        if pid in ATTACKERS and str(msg.content[CONFIG].get(TASK_KEY, "train")) == "train":
            trained = record_numpy(reply.content[ARRAYS])
            round_ = int(msg.content[CONFIG]["server-round"])
            reply.content[ARRAYS] = numpy_record(corrupt(kind, sent, trained, seed=1000 * round_ + pid))
        return reply

    return app


def one_run(name: str, attack: str, args, out: Path) -> dict:
    overrides = [
        f"seed={args.seed}",
        'partition.scheme="iid"',
        "partition.num_clients=8",
        "federation.clients_per_round=8",
        f"federation.rounds={args.rounds}",
        f"federation.checkpoint_every={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"sample.per_class={args.per_class}",
        f'model.preset="{args.preset}"',
        f'strategy.name="{name}"',
        *STRATEGIES[name],
    ]
    cfg = load_config(ROOT / CONFIG_FILE, overrides)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    app = None if attack == "clean" else byzantine_app(attack)
    run = run_all(cfg, out, client_app=app)
    summary = read_json(run.summary)
    return {
        "strategy": name,
        "attack": attack,
        "seconds": time.perf_counter() - start,
        **{k: summary[k] for k in KEYS},
    }


def table(rows: list[dict]) -> str:
    clean = {r["strategy"]: r for r in rows if r["attack"] == "clean"}
    lines = [
        "| strategy | attack | CAS | Δ CAS vs its clean run | FD | precision | recall |",
        "|" + " --- |" * 7,
    ]
    for r in rows:
        base = clean.get(r["strategy"])
        delta = f"{100 * (r['cas_accuracy'] - base['cas_accuracy']):+.1f}" if base and r is not base else "–"
        lines.append(
            f"| {r['strategy']} | {r['attack']} | {100 * r['cas_accuracy']:.1f}% | {delta} | {r['fd']:.2f} | "
            f"{r['precision']:.2f} | {r['recall']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--only", default=",".join(STRATEGIES))
    p.add_argument("--attacks", default="clean,sign-flip,noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-byzantine"))
    p.add_argument("--result", default="byzantine")
    args = p.parse_args()
    rows = []
    for name in args.only.split(","):
        for attack in args.attacks.split(","):
            rows.append(one_run(name, attack, args, args.runs_dir / f"{name}-{attack}"))
            print(json.dumps(rows[-1]), flush=True)
            setting = {k: v for k, v in vars(args).items() if k != "runs_dir"}
            write_result(
                args.result, {"setting": setting, "attackers": ATTACKERS, "scale": SCALE, "rows": rows}
            )
            (result_file(args.result, ".md")).write_text(
                f"Byzantine clients 0 and 1 of 8 (IID digits, all 8 per round, {args.rounds} rounds × "
                f"{args.local_steps} local steps, {args.preset} UNet, seed {args.seed}; "
                f"attack scale {SCALE})\n\n" + table(rows)
            )


if __name__ == "__main__":
    main()

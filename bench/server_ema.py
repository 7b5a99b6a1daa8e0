"""Server EMA of federated runs: which per-round EMA gives the best synthetic data. Trains
the demo once (``make demo``'s config, a checkpoint every round), then for each variant
rebuilds the EMA from the per-round global weights, samples and evaluates it. A number d is
a fixed decay (round 1 copied, then exactly d every round, no warm-up); ``warmup-D`` is the
server's EMA (``make_ema``: d_n = min(D, (1 + n) / (10 + n))); ``legacy`` is ``warmup-0.999``,
the EMA before ``federation.server_ema_decay`` existed. At 30 rounds every ``warmup-D`` with
D ≥ 0.77 is the same EMA (the cap never binds). Results: bench/results/server_ema/server-ema.{json,md}.

    .venv/bin/python bench/server_ema.py [--decays 0,0.5,0.8,0.9,0.95,legacy] [--seed 0]
        [--runs-dir runs/bench-server-ema] [--result server-ema]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from _common import ROOT, result_file, timed_fedsynth_run, write_result
from fedsynth.config import load_config
from fedsynth.core.rundir import RunDir, read_json
from fedsynth.data.datasets import load_dataset
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema
from fedsynth.evaluation.evaluate import evaluate_run
from fedsynth.pipeline import sample_run
from fedsynth.stages.checkpoint import save_model

CONFIG = "configs/digits-federated.toml"
KEYS = ("fd", "precision", "recall", "cas_accuracy", "class_tv_from_uniform")


def ema_model(trained: RunDir, decay: str) -> tuple[UNet2DModel, EMAModel, int]:
    """The server EMA over every round's global weights (checkpoints/round-NNNN/unet)."""
    rounds = sorted(trained.checkpoints.glob("round-*"))
    unet = UNet2DModel.from_pretrained(rounds[0] / "unet")
    if decay == "legacy" or decay.startswith("warmup-"):
        ema = make_ema(unet, 0.999 if decay == "legacy" else float(decay.removeprefix("warmup-")))
    else:
        ema = EMAModel(unet.parameters(), decay=float(decay), min_decay=float(decay))  # fixed decay
    for path in rounds:
        unet.load_state_dict(UNet2DModel.from_pretrained(path / "unet").state_dict())
        ema.step(unet.parameters())
    return unet, ema, len(rounds)


def judge(trained: RunDir, decay: str, out: Path) -> dict:
    target = RunDir(out / f"ema-{decay}")
    shutil.rmtree(target.root, ignore_errors=True)
    target.root.mkdir(parents=True)
    for name in ("config.toml", "partitions.json", "metrics.jsonl"):
        shutil.copy(trained.root / name, target.root / name)
    per_class = load_config(ROOT / CONFIG).sample.per_class  # training ran without sampling
    cfg = load_config(target.config, [f"sample.per_class={per_class}"])
    unet, ema, rounds = ema_model(trained, decay)
    scheduler = build_train_scheduler(cfg.diffusion)
    save_model(target, unet, ema, scheduler)  # writes the EMA weights; sampled from what it wrote
    model = UNet2DModel.from_pretrained(target.model / "unet").eval()
    names = list(load_dataset(cfg.data).full.class_names)
    sample_run(cfg, target, model, scheduler, names)
    evaluate_run(cfg, target)
    summary = read_json(target.summary)
    return {"decay": decay, "rounds": rounds, **{k: summary[k] for k in KEYS}}


def table(rows: list[dict]) -> str:
    lines = [
        "| server EMA decay | FD | precision | recall | CAS | class TV |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['decay']} | {r['fd']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
            f"{100 * r['cas_accuracy']:.1f}% | {r['class_tv_from_uniform']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decays", default="0,0.5,0.8,0.9,0.95,legacy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-server-ema"))
    p.add_argument("--result", default="server-ema")
    args = p.parse_args()
    trained = RunDir(args.runs_dir / f"train-seed{args.seed}")
    if not (trained.model / "unet").is_dir():
        shutil.rmtree(trained.root, ignore_errors=True)
        overrides = [f"seed={args.seed}", "federation.checkpoint_every=1", "sample.per_class=0"]
        timed_fedsynth_run(CONFIG, trained.root, overrides, "demo training")
    rows = []
    for decay in args.decays.split(","):
        rows.append(judge(trained, decay, args.runs_dir / f"seed{args.seed}"))
        print(rows[-1], flush=True)
        write_result(args.result, {"config": CONFIG, "seed": args.seed, "rows": rows})
        (result_file(args.result, ".md")).write_text(
            f"Server EMA decay on the demo (`{CONFIG}`, seed {args.seed}, one training run, "
            "EMA rebuilt from every round's global weights)\n\n" + table(rows)
        )


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()

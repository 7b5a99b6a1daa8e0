"""Sampler speed and quality on one trained model, in one run: DDPM-1000, DDIM-50/20,
DPM-Solver++-20/10 as fedsynth configures them, and DPM-Solver with diffusers' defaults
(no x̂0 clipping) to show why the defaults fail on small models.

    .venv/bin/python bench/sampling.py --run runs/demo-... [--per-class 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from _common import write_result
from fedsynth.config import load_config
from fedsynth.core.rundir import RunDir
from fedsynth.data.datasets import ImageData, load_dataset
from fedsynth.diffusion.sampling import generate
from fedsynth.diffusion.schedule import build_sampler
from fedsynth.evaluation.classifier import predict
from fedsynth.evaluation.domain import domain_classifier
from fedsynth.evaluation.metrics import fd_between, precision_recall
from fedsynth.stages.checkpoint import load_model
from fedsynth.stages.synthesize import balanced_labels

VARIANTS = [
    ("ddpm", 1000),
    ("ddim", 50),
    ("ddim", 20),
    ("dpm", 20),
    ("dpm", 10),
    ("dpm-diffusers-default", 20),
]


def make_sampler(name: str, steps: int, train_scheduler):
    if name == "dpm-diffusers-default":
        s = DPMSolverMultistepScheduler.from_config(train_scheduler.config)
        s.set_timesteps(steps)
        return s
    return build_sampler(name, train_scheduler, steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    run = RunDir(Path(args.run))
    cfg = load_config(run.config)
    unet, train_scheduler = load_model(run, torch.device("cpu"))
    data = load_dataset(cfg.data)
    domain = domain_classifier(data.train, epochs=cfg.eval.classifier_epochs, device=torch.device("cpu"))
    _, real_feats = predict(domain, data.test.images)
    labels = balanced_labels(data.full.num_classes, args.per_class)
    rows = {}
    for name, steps in VARIANTS:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        chunks = [
            generate(
                unet,
                make_sampler(name, steps, train_scheduler),
                labels[i : i + args.batch],
                generator=generator,
            )
            for i in range(0, len(labels), args.batch)
        ]
        seconds = time.perf_counter() - start
        fake = ImageData(torch.cat(chunks), labels, data.full.class_names)
        _, fake_feats = predict(domain, fake.images)
        p, r = precision_recall(real_feats.numpy(), fake_feats.numpy())
        rows[f"{name}-{steps}"] = {
            "images_per_s": len(labels) / seconds,
            "seconds": seconds,
            "fd": fd_between(real_feats.numpy(), fake_feats.numpy()),
            "precision": p,
            "recall": r,
        }
        print(f"{name}-{steps}", rows[f"{name}-{steps}"], flush=True)
    base = rows["ddpm-1000"]
    for row in rows.values():
        row["speedup_vs_ddpm1000"] = row["images_per_s"] / base["images_per_s"]
        row["fd_vs_ddpm1000"] = row["fd"] / base["fd"]
    fast = {
        k: v
        for k, v in rows.items()
        if k.split("-")[-1].isdigit() and int(k.split("-")[-1]) <= 25 and not k.startswith("dpm-diffusers")
    }
    best = min(fast, key=lambda k: fast[k]["fd"])
    write_result(
        "sampling",
        {
            "run": str(run.root),
            "per_class": args.per_class,
            "images": len(labels),
            "rows": rows,
            "best_fast_sampler": best,
            "goal": ">= 40x faster than DDPM-1000 with FD within 10% of it",
            "goal_met": rows[best]["speedup_vs_ddpm1000"] >= 40 and rows[best]["fd_vs_ddpm1000"] <= 1.10,
        },
    )


if __name__ == "__main__":
    main()

"""Training throughput: fedsynth's training step vs a plain PyTorch + diffusers loop.

Same model (preset), batch, data, threads and per-step work (DDPM ε-loss, AdamW,
gradient clipping, EMA). The two loops alternate in blocks inside one process so that
machine noise hits both alike; the ratio of medians is reported.

    .venv/bin/python bench/train_throughput.py [--preset small] [--steps 40] [--blocks 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from _common import write_result
from fedsynth.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from fedsynth.data.datasets import load_dataset
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_ema, make_optimizer, train_steps
from fedsynth.diffusion.unet import build_unet


def plain_loop(unet, scheduler, images, labels, steps, batch, lr, ema, g):
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    data = load_dataset(DataConfig()).train
    diff = DiffusionConfig()
    train = TrainConfig(batch_size=args.batch)
    scheduler = build_train_scheduler(diff)

    def fresh():
        torch.manual_seed(0)
        return build_unet(ModelConfig(preset=args.preset), 16, 1, 10)

    ours_unet, plain_unet = fresh(), fresh()
    ours_opt = make_optimizer(ours_unet, train)
    ours_ema, plain_ema = make_ema(ours_unet, 0.999), EMAModel(plain_unet.parameters(), decay=0.999)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    times = {"fedsynth": [], "plain": []}
    for block in range(args.blocks + 1):  # block 0 is warm-up
        t0 = time.perf_counter()
        train_steps(
            ours_unet,
            ours_opt,
            scheduler,
            data,
            steps=args.steps,
            train=train,
            diffusion=diff,
            generator=g1,
            ema=ours_ema,
        )
        t1 = time.perf_counter()
        plain_loop(
            plain_unet, scheduler, data.images, data.labels, args.steps, args.batch, train.lr, plain_ema, g2
        )
        t2 = time.perf_counter()
        if block:
            times["fedsynth"].append(args.steps * args.batch / (t1 - t0))
            times["plain"].append(args.steps * args.batch / (t2 - t1))
    ours, plain = statistics.median(times["fedsynth"]), statistics.median(times["plain"])
    write_result(
        "train_throughput",
        {
            "preset": args.preset,
            "batch": args.batch,
            "steps_per_block": args.steps,
            "blocks": args.blocks,
            "images_per_s": {"fedsynth": ours, "plain": plain},
            "samples": times,
            "ratio_fedsynth_over_plain": ours / plain,
            "goal": ">= 0.95",
        },
    )


if __name__ == "__main__":
    main()

"""DP-SGD's training-time overhead, side by side in one process: the same optimizer steps of
the centralized digits model (``small`` preset, batch 64) without DP, with fedsynth's DP-SGD
(per-example gradients by ``torch.func.vmap`` over the whole UNet), and with the per-example
gradients Opacus' ``GradSampleModule`` computes in its correct ``functorch`` mode, alternating
``--repeats`` times. Results: bench/results/dp_overhead.{json,md}.

    .venv/bin/python bench/dp_overhead.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from opacus import GradSampleModule

from _common import RESULTS, ROOT, write_result
from fedsynth.config import load_config
from fedsynth.data.datasets import load_dataset
from fedsynth.diffusion.objective import noisy_inputs
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_optimizer, train_steps
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.privacy.dpsgd import clip_and_noise, dp_train_steps, poisson_batch

CONFIG = "configs/digits-centralized.toml"


def opacus_steps(unet, optimizer, scheduler, data, steps: int, cfg) -> None:
    """The same DP-SGD steps with Opacus' per-example gradients (functorch mode)."""
    model = GradSampleModule(unet, batch_first=True, loss_reduction="sum", force_functorch=True)
    params = [p for p in unet.parameters() if p.requires_grad]
    gen, n = torch.Generator().manual_seed(0), len(data)
    q = cfg.train.batch_size / n
    for _ in range(steps):
        idx = poisson_batch(n, q, gen)
        noisy, t, noise = noisy_inputs(scheduler, data.images[idx], gen)
        model.zero_grad(set_to_none=True)
        pred = model(noisy, t, class_labels=data.labels[idx]).sample
        ((pred - noise) ** 2).flatten(1).mean(1).sum().backward()
        grads = clip_and_noise([p.grad_sample for p in params], max_norm=1.0, noise_multiplier=1.0,
                               expected_batch=q * n, generator=gen)  # fmt: skip
        for p, g in zip(params, grads, strict=True):
            p.grad_sample, p.grad = None, g
        optimizer.step()
    model._close()


def timed(mode: str, cfg, data, steps: int) -> float:
    unet = seeded_unet(cfg.model, 0, data.shape[1], data.shape[0], data.num_classes)
    optimizer = make_optimizer(unet, cfg.train)
    scheduler = build_train_scheduler(cfg.diffusion)
    gen = torch.Generator().manual_seed(0)
    common = dict(steps=steps, train=cfg.train, diffusion=cfg.diffusion, generator=gen)
    start = time.perf_counter()
    if mode == "plain":
        train_steps(unet, optimizer, scheduler, data, **common)
    elif mode == "fedsynth DP-SGD":
        dp_train_steps(unet, optimizer, scheduler, data, privacy=cfg.privacy, **common)
    else:
        opacus_steps(unet, optimizer, scheduler, data, steps, cfg)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cfg = load_config(ROOT / CONFIG, ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"])
    data = load_dataset(cfg.data).train
    modes = ("plain", "fedsynth DP-SGD", "Opacus functorch")
    timed("plain", cfg, data, 2)  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            seconds[mode].append(round(timed(mode, cfg, data, args.steps), 2))
            print(mode, seconds[mode][-1], flush=True)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    write_result("dp_overhead", {"config": CONFIG, "steps": args.steps, "seconds": seconds, "median": median})
    lines = [
        "# DP-SGD overhead (`bench/dp_overhead.py`)\n",
        f"`{CONFIG}` model and data, {args.steps} optimizer steps of batch 64 (Poisson, q = 64/1438 with "
        f"DP), {args.repeats} alternating repeats in one process; median seconds and the ratio to plain.\n",
        "| training | seconds (each repeat) | median | × plain |",
        "| --- | --- | --- | --- |",
        *(
            f"| {m} | {', '.join(map(str, seconds[m]))} | {median[m]:.2f} | "
            f"{median[m] / median['plain']:.2f} |"
            for m in modes
        ),
    ]
    (RESULTS / "dp_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

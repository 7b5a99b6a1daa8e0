"""DP-SGD's training-time overhead, side by side in one process: the same optimizer steps of
the centralized digits model (``small`` preset, batch 64) without DP, with fedsynth's DP-SGD
(per-example gradients by ``torch.func.vmap`` over the whole UNet), and with the per-example
gradients Opacus' ``GradSampleModule`` computes in its correct ``functorch`` mode, alternating
``--repeats`` times; and fedsynth's DP-SGD with every row of a batch in one vmapped pass (its
``ROWS_PER_PASS`` chunking undone). Results: bench/results/dp_overhead/dp_overhead.{json,md} (batch 64) or
dp_overhead_b{B}.{json,md}.

    .venv/bin/python bench/dp_overhead.py [--steps 20] [--repeats 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from opacus import GradSampleModule

from _common import ROOT, result_file, write_result
from fedsynth.config import load_config
from fedsynth.data.datasets import load_dataset
from fedsynth.diffusion.objective import noisy_inputs
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_optimizer, train_steps
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.privacy import dpsgd
from fedsynth.privacy.dpsgd import ClipGroups, clip_and_noise, dp_train_steps, poisson_batch

CONFIG = "configs/digits-centralized.toml"
ONE_PASS = "fedsynth DP-SGD, all rows in one pass"


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
        grads = clip_and_noise([p.grad_sample for p in params], groups=ClipGroups.whole(len(params), 1.0),
                               noise_multiplier=1.0, expected_batch=q * n, generator=gen)  # fmt: skip
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
    elif mode.startswith("fedsynth DP-SGD"):
        chunk = dpsgd.ROWS_PER_PASS
        dpsgd.ROWS_PER_PASS = len(data) if mode == ONE_PASS else chunk
        try:
            dp_train_steps(unet, optimizer, scheduler, data, privacy=cfg.privacy, **common)
        finally:
            dpsgd.ROWS_PER_PASS = chunk
    else:
        opacus_steps(unet, optimizer, scheduler, data, steps, cfg)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    sets = ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0", f"train.batch_size={args.batch_size}"]
    cfg = load_config(ROOT / CONFIG, sets)
    data = load_dataset(cfg.data).train
    modes = ("plain", "fedsynth DP-SGD", ONE_PASS, "Opacus functorch")
    timed("plain", cfg, data, 2)  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            seconds[mode].append(round(timed(mode, cfg, data, args.steps), 2))
            print(mode, seconds[mode][-1], flush=True)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    name = "dp_overhead" if args.batch_size == 64 else f"dp_overhead_b{args.batch_size}"
    payload = {"config": CONFIG, "steps": args.steps, "batch_size": args.batch_size, "seconds": seconds}
    write_result(name, {**payload, "median": median})
    lines = [
        "# DP-SGD overhead (`bench/dp_overhead.py`)\n",
        f"`{CONFIG}` model and data, {args.steps} optimizer steps of batch {args.batch_size} (Poisson, "
        f"q = {args.batch_size}/{len(data)} with DP), {args.repeats} alternating repeats in one process; "
        f"median seconds and the ratio to plain. fedsynth's DP-SGD computes per-example gradients "
        f"{dpsgd.ROWS_PER_PASS} rows a pass; the one-pass row takes the whole batch at once.\n",
        "| training | seconds (each repeat) | median | × plain |",
        "| --- | --- | --- | --- |",
        *(
            f"| {m} | {', '.join(map(str, seconds[m]))} | {median[m]:.2f} | "
            f"{median[m] / median['plain']:.2f} |"
            for m in modes
        ),
    ]
    (result_file(name, ".md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

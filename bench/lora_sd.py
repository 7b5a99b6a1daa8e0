"""A Stable-Diffusion-layout pipeline fine-tuned whole or through LoRA: what travels per client
and direction, and the training step's time, measured side by side in one process.

The pipeline is the tests' tiny random one (``tests/sd_tiny.py``: the same files and classes as
SD-1.5, 0.8 M UNet parameters) built offline at 32 px; optionally ``--sd-config`` counts a real
SD-1.5 UNet's parameters from its configuration (meta tensors: no weights needed). Rows:
full UNet, LoRA r ∈ {1, 4, 16} (fedavg: A and B; ffa: B only) on the attention projections.

    .venv/bin/python bench/lora_sd.py [--steps 20] [--batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, result_file, write_result

sys.path.insert(0, str(ROOT / "tests"))
from fedsynth.config import DiffusionConfig, LoraConfig, ModelConfig, TrainConfig
from fedsynth.diffusion.objective import diffusion_loss
from fedsynth.diffusion.schedule import build_train_scheduler
from fedsynth.diffusion.training import make_optimizer
from fedsynth.diffusion.unet import seeded_unet
from sd_tiny import build_tiny_pipeline

ATTENTION = "to_q,to_k,to_v,to_out.0"
NAMES = tuple(str(i) for i in range(10))


def trained_spec(rank: int, aggregation: str) -> str:
    if rank == 0:
        return ""
    return "*.lora_B" if aggregation == "ffa" else "*.lora_A,*.lora_B"


def measure(pipe: Path, rank: int, aggregation: str, steps: int, batch: int) -> dict:
    lora = (
        LoraConfig(rank=rank, targets=ATTENTION if rank else "", aggregation=aggregation)
        if rank
        else LoraConfig()
    )
    unet = seeded_unet(ModelConfig(init=str(pipe)), 0, 32, 3, 10, lora, class_names=NAMES)
    optimizer = make_optimizer(unet, TrainConfig(lr=1e-4), trained_spec(rank, aggregation))
    trained = [p for p in unet.parameters() if p.requires_grad]
    sched = build_train_scheduler(
        DiffusionConfig(num_train_timesteps=50, schedule="scaled_linear", clip_sample=False)
    )
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, 16, 16, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = diffusion_loss(unet, sched, z, y, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    times.sort()
    numel = sum(p.numel() for p in trained)
    return {
        "row": "full UNet" if rank == 0 else f"LoRA r = {rank} ({aggregation})",
        "trained_parameters": numel,
        "mb_per_client_and_direction": round(numel * 4 / 1e6, 4),
        "unet_parameters": sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n),
        "step_s_median": round(times[len(times) // 2], 4),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "# A Stable-Diffusion-layout pipeline: full UNet or LoRA (tiny random pipeline, 32 px, CPU)",
        "",
        "Command: `.venv/bin/python bench/lora_sd.py` (batch 16 of 16×16 latents, one torch thread). Step:",
        "one optimizer step of the denoising loss on cached latents (the UNet alone: prompts and latents",
        "are encoded once).",
        "",
        "| row | trained parameters | MB per client and direction | step s (median) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['trained_parameters']:,} | {r['mb_per_client_and_direction']:.3f} | "
            f"{r['step_s_median']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_pipeline(Path(tmp) / "tiny-sd")
        rows = [measure(pipe, 0, "fedavg", args.steps, args.batch)]
        rows += [
            measure(pipe, r, agg, args.steps, args.batch) for r in (1, 4, 16) for agg in ("fedavg", "ffa")
        ]
    write_result("lora_sd", {"steps": args.steps, "batch": args.batch, "threads": args.threads, "rows": rows})
    (result_file("lora_sd", ".md")).write_text(table(rows))


if __name__ == "__main__":
    main()

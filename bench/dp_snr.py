"""Why DP-SGD stalls: the clipped signal against the noise, per step, measured on a run's model.

For a DP-SGD run (default: the Fashion-MNIST ε = 10 row of ``bench/privacy.py``), at its seeded
initial weights and at its trained weights: the median per-example gradient norm, the norm of
the mean clipped gradient ‖(1/B) Σ ḡ_i‖ (64 test images, one (t, ε) draw each) and the norm of
the noise DP-SGD adds to that mean, σC√P / B (P parameters, B the expected batch). Their ratio
is the step's signal-to-noise ratio. Results: bench/results/dp_snr.{json,md}.

    .venv/bin/python bench/dp_snr.py [--run runs/bench-privacy/fashion-centralized-eps10-s0-b256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import RESULTS, write_result
from fedsynth.checkpoint import load_model
from fedsynth.config import load_config
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.prepare import prepare
from fedsynth.privacy.dpsgd import PrivateGradients, clip_and_noise
from fedsynth.rundir import RunDir

RUN = "runs/bench-privacy/fashion-centralized-eps10-s0-b256"


def measure(unet, scheduler, data, cfg, examples: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    private = PrivateGradients(
        unet,
        scheduler,
        data,
        train=cfg.train,
        diffusion=cfg.diffusion,
        privacy=cfg.privacy,
        generator=generator,
    )
    grads, _ = private.per_example(torch.arange(examples))
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
    # DP-SGD's steps 3–4 without the noise: the mean of the clipped per-example gradients
    mean_clipped = torch.cat([
        g.flatten()
        for g in clip_and_noise(
            grads, max_norm=cfg.privacy.max_grad_norm, noise_multiplier=0.0,
            expected_batch=examples, generator=generator,
        )
    ])  # fmt: skip
    params = sum(p.numel() for p in unet.parameters())
    noise = cfg.privacy.noise_multiplier * cfg.privacy.max_grad_norm * params**0.5 / cfg.train.batch_size
    signal = float(mean_clipped.norm())
    return {
        "median_example_norm": float(norms.median()),
        "mean_clipped_norm": signal,
        "noise_norm": noise,
        "snr": signal / noise,
        "parameters": params,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=RUN)
    args = p.parse_args()
    run = Path(args.run)
    cfg = load_config(run / "config.toml")
    test = prepare(cfg).data.test
    trained, scheduler = load_model(RunDir(run), torch.device("cpu"))
    initial = seeded_unet(cfg.model, cfg.seed, test.shape[1], test.shape[0], test.num_classes)
    rows = [
        {"weights": name, **measure(unet, scheduler, test, cfg)}
        for name, unet in (("seeded initial", initial), ("after its DP-SGD training", trained))
    ]
    pv = cfg.privacy
    write_result(
        "dp_snr", {"run": str(run), "sigma": pv.noise_multiplier, "batch": cfg.train.batch_size, "rows": rows}
    )
    lines = [
        "# DP-SGD's signal against its noise (`bench/dp_snr.py`)\n",
        f"Run `{run}`: σ = {pv.noise_multiplier}, C = {pv.max_grad_norm}, expected batch B = "
        f"{cfg.train.batch_size}, P = {rows[0]['parameters']:,} parameters; 64 test images, one "
        "(t, ε) draw each.\n",
        "| weights | median per-example gradient norm | ‖mean clipped gradient‖ | noise norm σC√P/B | SNR |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['weights']} | {r['median_example_norm']:.2f} | {r['mean_clipped_norm']:.3f} | "
            f"{r['noise_norm']:.3f} | {r['snr']:.2f} |"
            for r in rows
        ),
    ]
    (RESULTS / "dp_snr.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

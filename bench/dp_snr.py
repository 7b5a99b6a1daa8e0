"""Why DP-SGD stalls: the clipped signal against the noise, per step, measured on a run's model.

For a DP-SGD run (default: the Fashion-MNIST ε = 10 row of ``bench/privacy.py``), at its seeded
initial weights and at its trained weights: the median per-example gradient norm, the norm of
the mean clipped gradient ‖(1/B) Σ ḡ_i‖ (64 test images, one (t, ε) draw each) and the norm of
the noise DP-SGD adds to that mean, σC√P / B (P parameters, B the expected batch). Their ratio
is the step's signal-to-noise ratio, over all parameters and over parts of the model (default:
the class embedding, the only class-specific weights, and the residual blocks' projections
of the time-and-class embedding, through which it acts), with the whole gradient clipped at C and with
``privacy.clip_groups`` (default: the class embedding clipped at 0.005 with a fifth of the
noise budget). Results: bench/results/dp_snr/dp_snr.{json,md}, one section per run (other runs'
rows are kept).

    .venv/bin/python bench/dp_snr.py [--run runs/bench-privacy/fashion-centralized-eps10-s0-b256]
        [--clip-groups class_embedding=0.005:0.2 ...] [--parts class_embedding,*.time_emb_proj]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import load_rows, result_file, write_result
from fedsynth.config import load_config, under_module
from fedsynth.core.rundir import RunDir
from fedsynth.diffusion.unet import seeded_unet
from fedsynth.privacy.dpsgd import PrivateGradients, clip_and_noise, clip_groups
from fedsynth.stages.checkpoint import load_model
from fedsynth.stages.prepare import prepare

RUN = "runs/bench-privacy/fashion-centralized-eps10-s0-b256"
ALL = "all parameters"


def measure(
    unet, scheduler, data, cfg, clippings: list[str], parts: list[str], examples: int = 64
) -> list[dict]:
    """The step's signal and noise over all parameters and over each part (a module name or
    pattern, ``config.under_module``), for each clipping: the whole gradient at C ("") or
    ``privacy.clip_groups``. The per-example gradients are computed once and clipped each way."""
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
    rows = []
    for clipping in clippings:
        groups = clip_groups(private.names, cfg.privacy.max_grad_norm, clipping)
        # DP-SGD's steps 3–4 without the noise: the mean of the clipped per-example gradients
        mean_clipped = clip_and_noise(
            grads, groups=groups, noise_multiplier=0.0, expected_batch=examples, generator=generator
        )
        for part in [ALL, *parts]:
            chosen = [j for j, n in enumerate(private.names) if part == ALL or under_module(n, part)]
            params = sum(private.params[j].numel() for j in chosen)
            norms = torch.stack([grads[j].flatten(1).norm(dim=1) for j in chosen]).norm(dim=0)
            # σ (C_G / √s_G) per coordinate of group G (σC without groups), over B
            variance = sum(private.params[j].numel() * groups.noise[groups.of[j]] ** 2 for j in chosen)
            noise = cfg.privacy.noise_multiplier * variance**0.5 / cfg.train.batch_size
            signal = float(torch.cat([mean_clipped[j].flatten() for j in chosen]).norm())
            rows.append({
                "clipping": clipping or "whole gradient", "part": part, "parameters": params,
                "median_example_norm": float(norms.median()), "mean_clipped_norm": signal,
                "noise_norm": noise, "snr": signal / noise,
            })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=RUN)
    p.add_argument(
        "--clip-groups", nargs="*", default=["class_embedding=0.005:0.2"], help="privacy.clip_groups values"
    )
    p.add_argument("--parts", default="class_embedding,*.time_emb_proj", help="modules measured apart")
    args = p.parse_args()
    run = Path(args.run)
    cfg = load_config(run / "config.toml")
    test = prepare(cfg).data.test
    trained, scheduler = load_model(RunDir(run), torch.device("cpu"))
    initial = seeded_unet(cfg.model, cfg.seed, test.shape[1], test.shape[0], test.num_classes)
    rows = [
        {"weights": name, **row}
        for name, unet in (("seeded initial", initial), ("after its DP-SGD training", trained))
        for row in measure(unet, scheduler, test, cfg, ["", *args.clip_groups], args.parts.split(","))
    ]
    pv = cfg.privacy
    this = {
        "run": str(run),
        "sigma": pv.noise_multiplier,
        "C": pv.max_grad_norm,
        "batch": cfg.train.batch_size,
    }
    others = [r for r in load_rows("dp_snr") if "run" in r and r["run"] != str(run)]
    rows = [*others, *({**this, **row} for row in rows)]
    write_result("dp_snr", {"rows": rows})
    (result_file("dp_snr", ".md")).write_text(render(rows))


def render(rows: list[dict]) -> str:
    lines = [
        "# DP-SGD's signal against its noise (`bench/dp_snr.py`)\n",
        "Per run: 64 test images, one (t, ε) draw each. Rows per part: the signal and the noise "
        "restricted to those parameters (P their count), with the whole gradient clipped at C or with "
        "`privacy.clip_groups` (the noise then σ C_G / √s_G per coordinate of group G).\n",
    ]
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        first = mine[0]
        lines += [
            f"## `{run}`\n",
            f"σ = {first['sigma']}, C = {first['C']}, expected batch B = {first['batch']}.\n",
            "| weights | clipping | part | P | median per-example gradient norm (the part) "
            "| ‖mean clipped gradient‖ | noise norm (σC√P/B without groups) | SNR |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {r['weights']} | {r['clipping']} | {r['part']} | {r['parameters']:,} | "
                f"{r['median_example_norm']:.2f} | {r['mean_clipped_norm']:.3f} | {r['noise_norm']:.3f} | "
                f"{r['snr']:.2f} |"
                for r in mine
            ),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

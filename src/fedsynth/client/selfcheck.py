"""Phoenix threshold filtering, client side: how well does my model match my own data?

The client generates ``phoenix.filter_samples`` images (labels drawn from its own label
distribution) and computes precision and recall (k = 3) against as many of its own
images. Features come from a shared feature space: a small CNN whose weights are a
fixed function of the run seed, so every node computes the same features without any
data or download (random convolutional features; Phoenix used a pretrained Inception,
which cannot be fetched here).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from fedsynth.config import Config
from fedsynth.core.seeding import torch_generator
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.sampling import generate
from fedsynth.diffusion.schedule import build_sampler, build_train_scheduler
from fedsynth.evaluation.classifier import SmallCNN
from fedsynth.evaluation.metrics import precision_recall


def shared_features(seed: int, channels: int) -> SmallCNN:
    with torch.random.fork_rng(devices=[]):  # identical weights on every node, global RNG untouched
        torch.manual_seed(seed)
        return SmallCNN(channels, num_classes=1).eval()


@torch.no_grad()
def self_check(
    cfg: Config, unet: UNet2DModel, data: ImageData, round_: int, client_id: int
) -> tuple[float, float]:
    n = min(cfg.phoenix.filter_samples, len(data))
    g = torch_generator(cfg.seed, "self-check-data", round_, client_id)
    real = data.images[torch.randperm(len(data), generator=g)[:n]]
    labels = data.labels[torch.randint(len(data), (n,), generator=g)]
    device = next(unet.parameters()).device
    sampler = build_sampler("dpm", build_train_scheduler(cfg.diffusion), 20)
    cond = labels.to(device) if unet.config.num_class_embeds is not None else None
    gen = torch_generator(cfg.seed, "self-check-noise", round_, client_id, device=device)
    fake = generate(unet.eval(), sampler, cond, num_images=n, generator=gen).cpu()
    features = shared_features(cfg.seed, data.shape[0]).features
    return precision_recall(features(real).numpy(), features(fake).numpy(), k=3)

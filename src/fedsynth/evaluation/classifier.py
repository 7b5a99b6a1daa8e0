"""A small CNN classifier: the domain classifier (features for FD / precision / recall,
the real-data ceiling) and the CAS classifier (trained on synthetic data only)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.training import batch_indices


class SmallCNN(ModelMixin, ConfigMixin):
    """Three strided convolutions, global pooling and a linear head; a diffusers model so a
    federation can checkpoint and save it as it does the denoiser (task ``classifier``)."""

    @register_to_config
    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (keeps digits legible at 16x16)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator, device=generator.device))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    data: ImageData,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> SmallCNN:
    """Train the CNN on `data`; a function of (data, epochs, seed) only: initialisation, batch
    order, shifts and dropout all draw from `seed`, never from the caller's global RNG."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = SmallCNN(data.shape[0], data.num_classes).to(device)
        _fit(model, data, epochs, torch.Generator().manual_seed(seed), batch_size, lr)
    return model.eval()


def _fit(
    model: SmallCNN, data: ImageData, epochs: int, generator: torch.Generator, batch_size: int, lr: float
) -> None:
    device = next(model.parameters()).device
    steps_per_epoch = max(1, len(data) // min(batch_size, len(data)))
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    images, labels = data.images.to(device), data.labels.to(device)
    batches = batch_indices(len(data), batch_size, generator)
    model.train()
    for _ in range(total):
        idx = next(batches).to(device)
        loss = nn.functional.cross_entropy(model(augment(images[idx], generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def predict(
    model: SmallCNN, images: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) on CPU."""
    device = next(model.parameters()).device
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start : start + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)

"""What a federation trains (``task``): the class-conditional denoiser (``"diffusion"``, the
default: a generative model whose synthetic data is the product) or the domain-classifier
architecture (``"classifier"``: the downstream model itself, trained on the clients' data,
FedDiff's setting). Everything else — partitions, strategies, transports, faults,
checkpoints — is the same for both; this module holds what differs: the model, the
objective of a local step and the per-round test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import DDPMScheduler, ModelMixin, UNet2DModel
from torch import nn

from fedsynth.config import Config
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.training import optimizer_steps, train_steps
from fedsynth.diffusion.unet import build_unet, seeded_unet
from fedsynth.evaluation.classifier import SmallCNN, augment, predict

TASKS = ("diffusion", "classifier")


def model_class(cfg: Config) -> type[ModelMixin]:
    return SmallCNN if cfg.task == "classifier" else UNet2DModel


def build_model(
    cfg: Config, image_size: int, channels: int, num_classes: int, class_names: tuple[str, ...] = ()
) -> ModelMixin:
    """The task's model, freshly initialised from the global RNG (``class_names``: a latent
    denoiser's prompts)."""
    if cfg.task == "classifier":
        return SmallCNN(channels, num_classes)
    return build_unet(cfg.model, image_size, channels, num_classes, cfg.lora, class_names)


def seeded_model(
    cfg: Config,
    seed: int,
    image_size: int,
    channels: int,
    num_classes: int,
    class_names: tuple[str, ...] = (),
) -> ModelMixin:
    """:func:`build_model` with weights initialised from ``seed`` (global RNG left untouched),
    or for diffusion from ``model.init``."""
    if cfg.task == "diffusion":
        return seeded_unet(cfg.model, seed, image_size, channels, num_classes, cfg.lora, class_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg, image_size, channels, num_classes)


def classifier_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Cross-entropy on a batch shifted by up to a pixel, as the domain classifier trains."""
    return nn.functional.cross_entropy(model(augment(images, generator)), labels)


@contextlib.contextmanager
def dropout_rng(generator: torch.Generator) -> Iterator[None]:
    """The CNN's dropout draws from torch's global RNG: seed it from ``generator`` (the
    round's, derived from seed, round and client) and restore it afterwards, so a client's
    update stays a function of those alone and a resumed run repeats it exactly."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [generator.device] if generator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def task_steps(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler | None,
    data: ImageData,
    *,
    steps: int,
    generator: torch.Generator,
    penalty=None,
    after_backward=None,
    ema=None,
) -> list[float]:
    """``steps`` optimizer steps of the task's objective (the denoising loss, or the
    classifier's cross-entropy with its dropout seeded from ``generator``)."""
    if cfg.task == "classifier":
        with dropout_rng(generator):
            return optimizer_steps(
                model, optimizer, data, steps=steps, train=cfg.train, generator=generator,
                objective=classifier_loss, penalty=penalty, after_backward=after_backward, ema=ema,
            )  # fmt: skip
    assert scheduler is not None, "the diffusion task needs its noise scheduler"
    return train_steps(
        model, optimizer, scheduler, data, steps=steps, train=cfg.train, diffusion=cfg.diffusion,
        generator=generator, penalty=penalty, after_backward=after_backward, ema=ema,
    )  # fmt: skip


def heldout_accuracy(model: SmallCNN, test: ImageData) -> float:
    """Top-1 accuracy of ``model`` on ``test`` (evaluation mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    logits, _ = predict(model, test.images)
    model.train(was_training)
    return float((logits.argmax(1) == test.labels).float().mean())

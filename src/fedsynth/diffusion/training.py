"""Local training: optimizer steps of the diffusion objective on in-memory data.

Shared by the centralized baseline and by every federated client; it knows nothing
about Flower. Batches come from successive seeded permutations of the data (epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from fedsynth.config import DiffusionConfig, TrainConfig, module_list, trained_keys
from fedsynth.core.errors import ConfigError
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.latent import model_space
from fedsynth.diffusion.objective import diffusion_loss, drop_labels
from fedsynth.diffusion.unet import null_label

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def trainable_parameters(model: torch.nn.Module, spec: str) -> list[torch.nn.Parameter]:
    """``train.trainable``: with module names or patterns given, every parameter outside them is
    frozen (``requires_grad`` off: it keeps its initial weights, e.g. ``model.init``'s); the
    parameters left to train. A pattern matching no parameter is a ConfigError."""
    named = dict(model.named_parameters())
    if module_list(spec):
        chosen = set(trained_keys(spec, named))
        for name, p in named.items():
            p.requires_grad_(name in chosen)
    return [p for p in named.values() if p.requires_grad]


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, trainable: str | None = None
) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters: ``trainable`` (the run's
    ``Config.trained_modules``, LoRA adapters included), else ``train.trainable``."""
    params = trainable_parameters(model, cfg.trainable if trainable is None else trainable)
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_tensors(optimizer: torch.optim.Optimizer, unet: UNet2DModel) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state by parameter name (``name/exp_avg``, ``name/step``, …)."""
    out = {}
    for name, p in unet.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach().cpu().clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, unet: UNet2DModel, saved: dict) -> None:
    """Restore :func:`optimizer_tensors` output into a fresh optimizer over ``unet``; a
    parameter missing or of another shape starts fresh."""
    for name, p in unet.named_parameters():
        entries = {k.split("/", 1)[1]: v for k, v in saved.items() if k.split("/", 1)[0] == name}
        if entries and all(v.shape in (p.shape, ()) for v in entries.values()):
            optimizer.state[p] = {k: v.to(p.device) for k, v in entries.items()}


class ModelEMA(EMAModel):
    """diffusers' EMAModel over the parameters of a model that train, found by name:
    ``trainable`` (a module list for :func:`trained_keys`, the run's ``trained_modules``; ""
    = every parameter). A frozen parameter's average is its own constant value, so it is
    neither held nor stepped: with LoRA on a Stable Diffusion UNet the EMA holds the adapter
    (megabytes), not a second copy of the base (gigabytes)."""

    def __init__(self, model: torch.nn.Module, trainable: str = "", **kwargs: Any) -> None:
        self.names = trained_keys(trainable, (name for name, _ in model.named_parameters()))
        super().__init__(self.parameters_of(model), **kwargs)

    def parameters_of(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.names]

    def step_with(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self.step(self.parameters_of(model))

    def copy_into(self, model: torch.nn.Module) -> None:
        """The averages into ``model``'s parameters (its frozen ones are left as they are)."""
        self.copy_to(self.parameters_of(model))

    def named_shadow(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow_params, strict=True))


def make_ema(unet: torch.nn.Module, decay: float, trainable: str = "") -> ModelEMA:
    """EMA with diffusers' warm-up: its n-th step uses d_n = min(decay, (1 + n) / (10 + n))
    (the first step copies), w_ema ← d_n·w_ema + (1 − d_n)·w, over the parameters that train
    (``trainable``, :class:`ModelEMA`). Stepped after every optimizer step centrally
    (``diffusion.ema_decay``), once per round over the global model in the federated and
    decentralized paradigms (``federation.server_ema_decay``); decay 0 keeps the latest weights."""
    return ModelEMA(unet, trainable, decay=decay)


def steps_for(cfg: TrainConfig, num_samples: int) -> int:
    """Optimizer steps of one local round: ``local_steps``, or ``local_epochs`` passes."""
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * num_samples / cfg.batch_size))
    return cfg.local_steps


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless mini-batches of indices; each pass over the data is a fresh permutation."""
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def use_threads(threads: int) -> None:
    """``train.threads``: torch's intra-op threads in this process (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def train_steps(
    unet: UNet2DModel,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    data: ImageData,
    *,
    steps: int,
    train: TrainConfig,
    diffusion: DiffusionConfig,
    generator: torch.Generator,
    ema: ModelEMA | None = None,
    penalty: Callable[[UNet2DModel], torch.Tensor] | None = None,
    after_backward: Callable[[UNet2DModel], None] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """``steps`` optimizer steps of the denoising objective (labels dropped with
    ``diffusion.cfg_dropout`` for guidance); see :func:`optimizer_steps`."""
    null = null_label(unet)

    def objective(model, images, labels, gen) -> torch.Tensor:
        y = None if null is None else drop_labels(labels, diffusion.cfg_dropout, null, gen)
        return diffusion_loss(model, scheduler, images, y, gen, loss=diffusion.loss)

    return optimizer_steps(
        unet, optimizer, data, steps=steps, train=train, generator=generator, objective=objective,
        ema=ema, penalty=penalty, after_backward=after_backward, on_step=on_step,
    )  # fmt: skip


def optimizer_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageData,
    *,
    steps: int,
    train: TrainConfig,
    generator: torch.Generator,
    objective: Objective,
    ema: ModelEMA | None = None,
    penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[torch.nn.Module], None] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Run ``steps`` optimizer steps of ``objective(model, images, labels, generator)`` on
    mini-batches of ``data``; returns the per-step objective (without penalty).

    ``penalty`` adds a term to the loss (e.g. FedProx's proximal term);
    ``after_backward`` may edit gradients before the step (e.g. SCAFFOLD's correction).
    """
    device = next(model.parameters()).device
    images, labels = model_space(model, data.images).to(device), data.labels.to(device)
    model.train()
    losses: list[float] = []
    batches = batch_indices(len(data), train.batch_size, generator)
    for _ in range(steps):
        idx = next(batches).to(device)
        loss = objective(model, images[idx], labels[idx], generator)
        total = loss if penalty is None else loss + penalty(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if after_backward is not None:
            after_backward(model)
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.step_with(model)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(losses[-1])
    return losses

"""DP-SGD on the diffusion objective (Abadi et al. 2016, Alg. 1; DPDM, Dockhorn et al. 2023).

Notation: N examples, q = B / N the Poisson sampling rate (B = ``train.batch_size``),
C = ``privacy.max_grad_norm``, σ = ``privacy.noise_multiplier``, K =
``privacy.noise_multiplicity``. One step:

1. Poisson sampling: each example joins the batch with probability q (the accountant's
   assumption; the batch size varies, and may be 0).
2. Per-example gradients g_i of ℓ_i = (1/K) Σ_k ‖ε_k − ε_θ(x_{t_k}, t_k, y_i)‖² (K draws of
   (t, ε) per example, DPDM's noise multiplicity), by Opacus in ``functorch`` mode: its
   default ``hooks`` mode returns zero gradients for the convolutions after attention
   blocks (channels-last inputs; ``tests/test_privacy.py`` shows it).
3. Clip: ḡ_i = g_i · min(1, C / ‖g_i‖) (the norm over all parameters).
4. Noise: g̃ = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N), then the configured optimizer's step.

``train.grad_clip`` does not apply (step 3 is the clipping); label dropout for guidance
is drawn per example as in non-private training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from opacus import GradSampleModule

from fedsynth.config import DiffusionConfig, PrivacyConfig, TrainConfig
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.objective import drop_labels, noisy_inputs
from fedsynth.diffusion.unet import null_label

PER_EXAMPLE = {
    "mse": lambda pred, target: F.mse_loss(pred, target, reduction="none"),
    "huber": lambda pred, target: F.smooth_l1_loss(pred, target, reduction="none", beta=1.0),
}


def poisson_batch(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the examples drawn, each independently with probability q."""
    return torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < q).flatten()


def clip_and_noise(
    per_example: list[torch.Tensor],
    *,
    max_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Steps 3–4: the privatised gradient of each parameter from its per-example gradients
    (``per_example[j]`` has shape [B, *param_shape]; B may be 0)."""
    # 3. ‖g_i‖ over every parameter, then the clip factor min(1, C / ‖g_i‖)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example]).norm(dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    out = []
    for g in per_example:
        # 4. (Σ_i ḡ_i + N(0, σ²C²)) / (qN)
        clipped_sum = torch.einsum("i,i...->...", factor.to(g.dtype), g)
        noise = torch.randn(clipped_sum.shape, generator=generator, device=g.device, dtype=g.dtype)
        out.append((clipped_sum + noise_multiplier * max_norm * noise) / expected_batch)
    return out


def per_example_losses(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    *,
    multiplicity: int,
    loss: str,
) -> torch.Tensor:
    """Step 2's ℓ over K·B rows (the batch repeated K times), each row scaled by 1/K so that
    summing a row's K per-example gradients gives ∇ℓ_i."""
    x = x0.repeat(multiplicity, *([1] * (x0.dim() - 1)))
    y = None if labels is None else labels.repeat(multiplicity)
    noisy, t, noise = noisy_inputs(scheduler, x, generator)
    pred = model(noisy, t, class_labels=y).sample
    return PER_EXAMPLE[loss](pred, noise).flatten(1).mean(1) / multiplicity


class PrivateGradients:
    """Steps 1–4 for one UNet: ``step()`` sets every parameter's ``.grad`` to the privatised
    gradient of a fresh Poisson batch. Holds Opacus' wrapper until ``close()``."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        data: ImageData,
        *,
        train: TrainConfig,
        diffusion: DiffusionConfig,
        privacy: PrivacyConfig,
        generator: torch.Generator,
    ) -> None:
        device = next(unet.parameters()).device
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.scheduler, self.diffusion, self.privacy, self.generator = (
            scheduler,
            diffusion,
            privacy,
            generator,
        )
        self.null, self.n = null_label(unet), len(data)
        self.q = min(1.0, train.batch_size / self.n)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.model = GradSampleModule(unet, batch_first=True, loss_reduction="sum", force_functorch=True)

    def per_example(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], float | None]:
        """Step 2 for the drawn examples: their gradients and mean objective (None if none)."""
        if not len(idx):
            return [p.new_zeros((0, *p.shape)) for p in self.params], None
        k, d = self.privacy.noise_multiplicity, self.diffusion
        y = (
            None
            if self.null is None
            else drop_labels(self.labels[idx], d.cfg_dropout, self.null, self.generator)
        )
        rows = per_example_losses(
            self.model, self.scheduler, self.images[idx], y, self.generator, multiplicity=k, loss=d.loss
        )
        self.model.zero_grad(set_to_none=True)
        rows.sum().backward()
        grads = [p.grad_sample.view(k, len(idx), *p.shape).sum(0) for p in self.params]
        return grads, float(rows.detach().sum() / len(idx))

    def step(self) -> float | None:
        idx = poisson_batch(self.n, self.q, self.generator)  # 1.
        per_example, loss = self.per_example(idx)  # 2.
        grads = clip_and_noise(  # 3.–4.
            per_example,
            max_norm=self.privacy.max_grad_norm,
            noise_multiplier=self.privacy.noise_multiplier,
            expected_batch=self.q * self.n,
            generator=self.generator,
        )
        for p, g in zip(self.params, grads, strict=True):
            p.grad_sample, p.grad = None, g
        return loss

    def close(self) -> None:
        self.model._close()  # removes Opacus' hooks and attributes from the UNet


def dp_train_steps(
    unet: UNet2DModel,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    data: ImageData,
    *,
    steps: int,
    train: TrainConfig,
    diffusion: DiffusionConfig,
    privacy: PrivacyConfig,
    generator: torch.Generator,
    ema: EMAModel | None = None,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """``steps`` DP-SGD steps (module docstring); the mean objective of each non-empty batch."""
    unet.train()
    losses: list[float] = []
    with warnings.catch_warnings():
        # Opacus' functorch path: its backward hooks fire on outputs (the images need no
        # gradient) and it asks CPU autocast for float32; neither affects the result
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
        private = PrivateGradients(
            unet, scheduler, data, train=train, diffusion=diffusion, privacy=privacy, generator=generator
        )
        try:
            for _ in range(steps):
                loss = private.step()
                optimizer.step()
                if ema is not None:
                    ema.step(unet.parameters())
                if loss is not None:
                    losses.append(loss)
                if on_step is not None:
                    on_step(losses[-1] if losses else float("nan"))
        finally:
            private.close()
    return losses or [float("nan")]

"""DP-SGD on the diffusion objective (Abadi et al. 2016, Alg. 1; DPDM, Dockhorn et al. 2023).

Notation: N examples, q = B / N the Poisson sampling rate (B = ``train.batch_size``),
C = ``privacy.max_grad_norm``, σ = ``privacy.noise_multiplier``, K =
``privacy.noise_multiplicity``. One step:

1. Poisson sampling: each example joins the batch with probability q (the accountant's
   assumption; the batch size varies, and may be 0).
2. Per-example gradients g_i of ℓ_i = (1/K) Σ_k ‖ε_k − ε_θ(x_{t_k}, t_k, y_i)‖² (K draws of
   (t, ε) per example, DPDM's noise multiplicity): ``torch.func.vmap`` of ``grad`` over the
   examples, the whole UNet in one batched pass. (Opacus' ``GradSampleModule`` was measured
   slower — its ``functorch`` mode recomputes every layer per example — and its default
   ``hooks`` mode returns zero gradients for the convolutions after attention blocks, whose
   inputs are channels-last; ``tests/test_privacy.py`` shows both the error and that the
   gradients here match a one-example-at-a-time reference.)
3. Clip: ḡ_i = g_i · min(1, C / ‖g_i‖) (the norm over all parameters).
4. Noise: g̃ = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N), then the configured optimizer's step.

``train.grad_clip`` does not apply (step 3 is the clipping); label dropout for guidance
is drawn per example as in non-private training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.func import functional_call, grad_and_value, vmap

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


def by_example(a: torch.Tensor, k: int) -> torch.Tensor:
    """Rows k·B + i of a K-times repeated batch → shape (B, K, …): example i's K draws."""
    return a.view(k, -1, *a.shape[1:]).transpose(0, 1)


class PrivateGradients:
    """Steps 1–4 for one UNet: ``step()`` sets every parameter's ``.grad`` to the privatised
    gradient of a fresh Poisson batch."""

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
        self.scheduler, self.diffusion = scheduler, diffusion
        self.privacy, self.generator = privacy, generator
        self.null, self.n = null_label(unet), len(data)
        self.q = min(1.0, train.batch_size / self.n)
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.unet, self.buffers = unet, dict(unet.named_buffers())
        labelled = (None, 0, 0, None if self.null is None else 0, 0)
        self.grad_fn = vmap(grad_and_value(self.example_loss), in_dims=labelled)

    def example_loss(self, params: dict, noisy: torch.Tensor, t: torch.Tensor, y, noise: torch.Tensor):
        """ℓ_i over example i's K draws (step 2), as a function of the parameters."""
        pred = functional_call(self.unet, (params, self.buffers), (noisy, t), {"class_labels": y}).sample
        return PER_EXAMPLE[self.diffusion.loss](pred, noise).flatten(1).mean(1).mean()

    def per_example(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], float | None]:
        """Step 2 for the drawn examples: their gradients and mean objective (None if none)."""
        if not len(idx):
            return [p.new_zeros((0, *p.shape)) for p in self.params], None
        k, dropout = self.privacy.noise_multiplicity, self.diffusion.cfg_dropout
        y = None if self.null is None else drop_labels(self.labels[idx], dropout, self.null, self.generator)
        x = self.images[idx].repeat(k, *([1] * (self.images.dim() - 1)))  # rows k·B + i
        noisy, t, noise = noisy_inputs(self.scheduler, x, self.generator)
        y = None if y is None else by_example(y.repeat(k), k)
        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        grads, losses = self.grad_fn(params, by_example(noisy, k), by_example(t, k), y, by_example(noise, k))
        return [grads[n] for n in self.names], float(losses.mean())

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
            p.grad = g
        return loss


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
    private = PrivateGradients(
        unet, scheduler, data, train=train, diffusion=diffusion, privacy=privacy, generator=generator
    )
    for _ in range(steps):
        loss = private.step()
        optimizer.step()
        if ema is not None:
            ema.step(unet.parameters())
        if loss is not None:
            losses.append(loss)
        if on_step is not None:
            on_step(losses[-1] if losses else float("nan"))
    return losses or [float("nan")]

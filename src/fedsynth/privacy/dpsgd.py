"""DP-SGD on the diffusion objective (Abadi et al. 2016, Alg. 1; DPDM, Dockhorn et al. 2023).

Notation: N examples, q = B / N the Poisson sampling rate (B = ``train.batch_size``),
C = ``privacy.max_grad_norm``, σ = ``privacy.noise_multiplier``, K =
``privacy.noise_multiplicity``. One step:

1. Poisson sampling: each example joins the batch with probability q (the accountant's
   assumption; the batch size varies, and may be 0).
2. Per-example gradients g_i of ℓ_i = (1/K) Σ_k ‖ε_k − ε_θ(x_{t_k}, t_k, y_i)‖² (K draws of
   (t, ε) per example, DPDM's noise multiplicity): ``torch.func.vmap`` of ``grad`` over the
   B·K rows, the whole UNet batched (``ROWS_PER_PASS`` rows a pass), then each example's
   mean over its K rows. (Opacus' ``GradSampleModule`` was measured
   slower — its ``functorch`` mode recomputes every layer per example — and its default
   ``hooks`` mode returns zero gradients for the convolutions after attention blocks, whose
   inputs are channels-last; ``tests/test_privacy.py`` shows both the error and that the
   gradients here match a one-example-at-a-time reference.)
3. Clip: ḡ_i = g_i · min(1, C / ‖g_i‖) (the norm over all parameters).
4. Noise: g̃ = (Σ_i ḡ_i + N(0, σ² C² I)) / (q N), then the configured optimizer's step.
5. With ``privacy.public_subspace`` (projected DP-SGD: PDP-SGD, Zhou et al. 2021; GEP, Yu et
   al. 2021): g̃ ← V Vᵀ g̃, V (P × k, orthonormal) the top-k right singular vectors of the
   per-example gradients of ``privacy.subspace_examples`` public images at the weights the
   call starts from (k = ``privacy.subspace_dim``). Post-processing of step 4's output, so ε
   is unchanged; of the noise only its k-dimensional part is left (norm σC√k/(qN), not
   σC√P/(qN)), of the signal what lies in V's span.

Group-wise clipping (``privacy.clip_groups``; per-layer clipping, McMahan et al. 2018; He et
al. 2023): the parameters split into groups G with their own norms C_G and shares s_G of the
noise budget, Σ_G s_G = 1 (the other parameters: C and the share left). Steps 3–4 per group:
ḡ_{i,G} = g_{i,G} · min(1, C_G / ‖g_{i,G}‖) and g̃_G = (Σ_i ḡ_{i,G} + N(0, σ² C_G² / s_G · I)) / (qN).
Why the accountant still applies: scaling each group by √s_G / C_G puts every example's
clipped gradient in the unit ball (Σ_G s_G ≤ 1), where N(0, σ² I) is the Gaussian mechanism
it counts; the noise above is that noise scaled back. What it is for: a group whose
per-example gradients are far smaller than C (on digits the class-conditioning path: the class
embedding ~0.01, every block's ``time_emb_proj`` together ~0.08, against whole gradients of
~0.9; bench/results/dp_snr/dp_snr.md) is noised at its own scale, not at C's.

``train.grad_clip`` does not apply (step 3 is the clipping); label dropout for guidance
is drawn per example as in non-private training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch.func import functional_call, grad_and_value, vmap

from fedsynth.config import (
    DataConfig,
    DiffusionConfig,
    PrivacyConfig,
    TrainConfig,
    parse_clip_groups,
    under_module,
)
from fedsynth.core.errors import ConfigError
from fedsynth.data.datasets import ImageData, load_dataset
from fedsynth.diffusion.latent import model_space
from fedsynth.diffusion.objective import drop_labels, noisy_inputs
from fedsynth.diffusion.training import ModelEMA
from fedsynth.diffusion.unet import null_label

PER_EXAMPLE = {
    "mse": lambda pred, target: F.mse_loss(pred, target, reduction="none"),
    "huber": lambda pred, target: F.smooth_l1_loss(pred, target, reduction="none", beta=1.0),
}


def poisson_batch(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the examples drawn, each independently with probability q."""
    return torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < q).flatten()


class ClipGroups(NamedTuple):
    """Group-wise clipping of a parameter list: the group of each parameter, and each group's
    clipping norm C_G and noise std per unit σ, C_G / √s_G."""

    of: list[int]
    norms: list[float]
    noise: list[float]

    @classmethod
    def whole(cls, count: int, max_norm: float) -> ClipGroups:
        """Steps 3–4 without groups: every parameter in one group, C and noise σC."""
        return cls([0] * count, [max_norm], [max_norm])


def clip_groups(names: Sequence[str], max_norm: float, text: str = "") -> ClipGroups:
    """The groups of ``privacy.clip_groups`` over the named parameters: group k < len(items)
    holds the parameters under the k-th item's module (``config.under_module``: a name or a
    pattern such as ``*.time_emb_proj``; the first matching item wins), the last group the
    rest (C = ``max_norm``). Groups without a share, the rest included when it holds any
    parameter, split the share left evenly."""
    items = parse_clip_groups(text)
    patterns = list(items)
    of = [next((k for k, p in enumerate(patterns) if under_module(name, p)), len(patterns)) for name in names]
    for k, pattern in enumerate(patterns):
        if k not in of:
            raise ConfigError(f"privacy.clip_groups: no trainable parameter is {pattern!r} or under it")
    specs = [*items.values(), (max_norm, None)]
    unset = [k for k, (_, share) in enumerate(specs) if share is None and k in of]
    left = 1.0 - sum(share for _, share in specs if share is not None)
    shares = [left / len(unset) if k in unset else (share or 0.0) for k, (_, share) in enumerate(specs)]
    noise = [
        norm / math.sqrt(share) if share > 0 else 0.0 for (norm, _), share in zip(specs, shares, strict=True)
    ]
    return ClipGroups(of, [norm for norm, _ in specs], noise)


def clip_and_noise(
    per_example: list[torch.Tensor],
    *,
    groups: ClipGroups,
    noise_multiplier: float,
    expected_batch: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Steps 3–4: the privatised gradient of each parameter from its per-example gradients
    (``per_example[j]`` has shape [B, *param_shape]; B may be 0), clipped and noised by
    ``groups`` (``ClipGroups.whole``: the whole gradient at C)."""
    # 3. ‖g_{i,G}‖ over each group's parameters, then the clip factor min(1, C_G / ‖g_{i,G}‖)
    squares = torch.stack([g.flatten(1).square().sum(1) for g in per_example])
    index = torch.tensor(groups.of, device=squares.device)
    norms = squares.new_zeros(len(groups.norms), squares.shape[1]).index_add_(0, index, squares).sqrt()
    factors = (squares.new_tensor(groups.norms)[:, None] / (norms + 1e-6)).clamp(max=1.0)
    out = []
    for g, k in zip(per_example, groups.of, strict=True):
        # 4. (Σ_i ḡ_i + N(0, σ² C_G² / s_G)) / (qN); without groups, σ²C²
        clipped_sum = torch.einsum("i,i...->...", factors[k].to(g.dtype), g)
        noise = torch.randn(clipped_sum.shape, generator=generator, device=g.device, dtype=g.dtype)
        out.append((clipped_sum + noise_multiplier * groups.noise[k] * noise) / expected_batch)
    return out


# rows per vmapped pass in step 2: on CPU one pass over 512 rows took 1.75× (the whole `small`
# UNet) to 4× (K = 4, the conditioning path alone) the time of four passes of 128
ROWS_PER_PASS = 128


def project(grads: list[torch.Tensor], basis: torch.Tensor) -> list[torch.Tensor]:
    """Step 5: g ← V Vᵀ g, g the parameters' gradients flattened and concatenated, V = ``basis``."""
    flat = torch.cat([g.flatten() for g in grads])
    flat = basis @ (basis.T @ flat)
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]


@functools.lru_cache(maxsize=2)
def public_images(name: str, image_size: int, channels: int) -> ImageData:
    """The training split of an installed dataset (``privacy.public_subspace``), at the run's
    image size and channels; read once per process."""
    return load_dataset(DataConfig(dataset=name, image_size=image_size, channels=channels)).train


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
        self.images, self.labels = model_space(unet, data.images).to(device), data.labels.to(device)
        self.scheduler, self.diffusion = scheduler, diffusion
        self.privacy, self.generator = privacy, generator
        self.null, self.n = null_label(unet), len(data)
        self.q = min(1.0, train.batch_size / self.n)
        named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.unet, self.buffers = unet, dict(unet.named_buffers())
        self.groups = clip_groups(self.names, privacy.max_grad_norm, privacy.clip_groups)
        labelled = (None, 0, 0, None if self.null is None else 0, 0)
        self.grad_fn = vmap(grad_and_value(self.example_loss), in_dims=labelled)
        self.basis = self.public_basis(data) if privacy.public_subspace else None

    def public_basis(self, data: ImageData) -> torch.Tensor:
        """Step 5's V: the top-k right singular vectors of public per-example gradients (K = 1),
        drawn with a generator seeded from this one (one draw of the private stream)."""
        p, shape = self.privacy, tuple(data.images.shape[1:])
        public = public_images(p.public_subspace, shape[-1], shape[0])
        count = sum(t.numel() for t in self.params)
        if self.null is not None and public.num_classes > self.null:
            raise ConfigError(
                f"privacy.public_subspace: {p.public_subspace!r} has {public.num_classes} classes, "
                f"the model {self.null}"
            )
        if p.subspace_dim > min(count, p.subspace_examples, len(public)):
            raise ConfigError(
                f"privacy.subspace_dim = {p.subspace_dim} exceeds the trainable parameters ({count}), "
                f"privacy.subspace_examples ({p.subspace_examples}) or the public images ({len(public)})"
            )
        device = self.images.device
        seed = int(torch.randint(2**62, (1,), generator=self.generator, device=device))
        gen = torch.Generator(device=device).manual_seed(seed)
        one = dataclasses.replace(p, public_subspace="", noise_multiplicity=1)
        helper = PrivateGradients(
            self.unet, self.scheduler, public, train=TrainConfig(), diffusion=self.diffusion, privacy=one,
            generator=gen,
        )  # fmt: skip
        idx = torch.randperm(len(public), generator=gen, device=device)[: p.subspace_examples]
        grads, _ = helper.per_example(idx)
        # in float64: a float32 SVD over ~10⁵ coordinates is orthonormal only to ~1e-4 on some CPUs
        matrix = torch.cat([g.flatten(1) for g in grads], 1).double()
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return vh[: p.subspace_dim].T.float().contiguous()

    def example_loss(self, params: dict, noisy: torch.Tensor, t: torch.Tensor, y, noise: torch.Tensor):
        """The objective of one row (one draw of (t, ε) for one example), as a function of the
        parameters; step 2 averages an example's K rows' gradients."""
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
        rows = [by_example(a, k) for a in (noisy, t, noise)]
        rows += [] if y is None else [y[:, None].expand(-1, k)]
        chunk = max(1, ROWS_PER_PASS // k)
        parts = [self.mean_gradients([a[s : s + chunk] for a in rows]) for s in range(0, len(idx), chunk)]
        grads = [torch.cat([g[j] for g, _ in parts]) for j in range(len(self.params))]
        return grads, float(torch.cat([loss for _, loss in parts]).mean())

    def mean_gradients(self, rows: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each example's gradient, the mean of its K rows' (shape (c, K, …) inputs: noisy, t,
        noise[, y]); every row's own gradient in one ``vmap`` (a vmapped batch of K per example
        runs ~3× slower on CPU than the same rows one by one)."""
        noisy, t, noise, *y = (a.flatten(0, 1)[:, None] for a in rows)
        params = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        grads, losses = self.grad_fn(params, noisy, t, y[0] if y else None, noise)
        c = len(rows[0])
        return [grads[n].view(c, -1, *grads[n].shape[1:]).mean(1) for n in self.names], losses

    def step(self) -> float | None:
        idx = poisson_batch(self.n, self.q, self.generator)  # 1.
        per_example, loss = self.per_example(idx)  # 2.
        grads = clip_and_noise(  # 3.–4.
            per_example,
            groups=self.groups,
            noise_multiplier=self.privacy.noise_multiplier,
            expected_batch=self.q * self.n,
            generator=self.generator,
        )
        if self.basis is not None:
            grads = project(grads, self.basis)  # 5.
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
    ema: ModelEMA | None = None,
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
            ema.step_with(unet)
        if loss is not None:
            losses.append(loss)
        if on_step is not None:
            on_step(losses[-1] if losses else float("nan"))
    return losses or [float("nan")]

"""FedDiff (Li & Ping): the server consolidates a small subset of the clients'
parameters with a weight-space latent diffusion model instead of averaging it; every other
parameter is aggregated by a base strategy (FedAvg by default).

Notation (paper → code):

    θ_i^r        client i's weights after local training          → the round's replies
    v_i ∈ R^D    the flattened subset of θ_i, normalised           → ``v`` (:meth:`WeightSpace.normalise`)
    g_σ, g_ρ     encoder, decoder of the weight autoencoder        → ``WeightAE.encode`` / ``decode``
    ξ_V, ξ_Z     input / latent noise amplitudes (0.01, 0.1)       → ``input_noise`` / ``latent_noise``
    ε_ψ          the latent DDPM's 1-D CNN denoiser (T steps)       → :class:`LatentDenoiser`
    N(μ_i, σ_i²) client i's latent distribution: μ_i = g_σ(v_i), σ_i = ξ_Z
    μ_s, σ_s²    the consolidated distribution (eq. 8)             → :func:`consolidate`
    Z_s          |S| reparameterised samples z_i = μ_s + σ_s ε^(i)
    z_corr       the pool latent whose score is nearest the round's base aggregate's
    t_r          LDM steps in round r, T ∝ r (eq. 12)              → :func:`denoise_steps`

Pre-training (§2.2; the pool itself is collected on the proxy set by
``server/weight_pool.py``): the pool V (W × D, ordered by score) trains the autoencoder with
L_AE = mean ‖v − g_ρ(g_σ(v + ξ_V) + ξ_Z)‖² (eq. 6), then the LDM on Z⁰ = g_σ(V) with
L_LDM = E‖ε − ε_ψ(Z^t, t)‖² (eq. 7).

Each round (§2.3, :meth:`FedDiff.aggregate_train`):

1. the base strategy aggregates every parameter;
2. the encoder is fine-tuned ``encoder_steps`` steps (decoder frozen) on
   L = mean_i ‖v_i − g_ρ(μ_i + σ_i ε)‖² + α KL[N(μ_s, σ_s²) ‖ N(0, 1)]  (eq. 9)
       + β mean_i ‖z_corr − z_i‖²                                    (eqs. 10, 11);
3. consolidation (eq. 8) and |S| reparameterised samples Z_s;
4. the LDM's reverse chain runs t_r = ⌈t_final · r / R⌉ steps from Z_s (eq. 12: Z_s enters as
   Z^{t_r}; with ``renoise`` it is first diffused to step t_r, SDEdit-style);
5. each sample is decoded; the one the proxy set scores best becomes the subset of θ^{r+1}.

What the paper leaves open, chosen here (all in ``[feddiff]``): σ_i is the latent noise ξ_Z
the decoder was trained to accept (the encoder is deterministic, as in eq. 5), so eq. 8's
σ_s = ξ_Z; weights are centred by the pool mean and divided by one scalar (the pool's
standard deviation), latents likewise before the LDM; squared norms are per-coordinate
means; the LDM uses a cosine noise schedule (so ᾱ_T ≈ 0 for T = 200); z_corr is chosen by
the proxy-set score of the base aggregate; of the |S| decoded samples the best on the proxy
set is kept. Randomness comes from (seed, round), so a resumed run repeats a round exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from fedsynth.config import FedDiffConfig, keys_under, module_list
from fedsynth.core.errors import ConfigError
from fedsynth.core.protocol import ARRAYS
from fedsynth.core.seeding import torch_generator
from fedsynth.strategies.state import Stateful

Weights = dict[str, torch.Tensor]
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)


# ---------------------------------------------------------------------- the maths
def consolidate(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: μ_s = mean_i μ_i, σ_s² = mean_i σ_i² (clients along the first dimension)."""
    return mu.mean(0), var.mean(0)


def kl_to_standard(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL[N(μ, σ²) ‖ N(0, 1)] per coordinate, averaged: ½ mean(σ² + μ² − 1 − log σ²)."""
    return 0.5 * (var + mu**2 - 1 - var.log()).mean()


def denoise_steps(round_: int, rounds: int, t_final: int) -> int:
    """Eq. 12's T ∝ r: t_r = ⌈t_final · r / R⌉, at least 1 and at most t_final."""
    return min(t_final, max(1, math.ceil(t_final * round_ / rounds)))


def subset_keys(model: nn.Module, prefixes: str) -> list[str]:
    """The state-dict keys FedDiff generates: those under the comma-separated ``prefixes``,
    or (``""``) the parameters of the model's last normalisation layer, as p-diff does."""
    keys = [k for k, _ in model.named_parameters()]
    if prefixes:
        return keys_under(keys, module_list(prefixes), "feddiff.subset")
    norms = [name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)]
    if not norms:
        raise ConfigError("feddiff.subset = '' needs a normalisation layer in the model; name one")
    return [k for k in keys if k.startswith(norms[-1] + ".")]


def flatten(weights: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([weights[k].detach().reshape(-1).float().cpu() for k in keys])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], keys: list[str]) -> Weights:
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[start : start + n].reshape(like[k].shape).to(like[k].dtype)
        start += n
    return out


# ---------------------------------------------------------------------- the networks
class WeightAE(nn.Module):
    """Eq. 5's autoencoder: 4 strided 1-D convolutions down (D → D/16 positions × ``latent``
    channels) and 4 transposed ones up; the input is zero-padded to a multiple of 16."""

    def __init__(self, dim: int, width: int = 32, latent: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.dim, self.padded = dim, math.ceil(dim / 2**layers) * 2**layers
        down = [1] + [width] * (layers - 1) + [latent]
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(layers):
            enc += [nn.Conv1d(down[i], down[i + 1], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            dec += [nn.ConvTranspose1d(down[-1 - i], down[-2 - i], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.encoder, self.decoder = nn.Sequential(*enc[:-1]), nn.Sequential(*dec[:-1])

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        return self.encoder(nn.functional.pad(v, (0, self.padded - self.dim)).unsqueeze(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).squeeze(1)[:, : self.dim]


class LatentDenoiser(nn.Module):
    """ε_ψ(Z^t, t): a 4-layer 1-D CNN over the latent positions, the timestep's sinusoidal
    embedding added to every hidden layer, residual in the middle layers."""

    def __init__(self, channels: int = 4, width: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv1d(channels, width, 3, padding=1)
        self.mid = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(layers - 2))
        self.out = nn.Conv1d(width, channels, 3, padding=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(get_timestep_embedding(t.reshape(-1).expand(len(z)), self.width))[:, :, None]
        h = nn.functional.silu(self.inp(z) + emb)
        for conv in self.mid:
            h = h + nn.functional.silu(conv(h) + emb)
        return self.out(h)


def ldm_scheduler(timesteps: int) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False)


def _batches(n: int, size: int, steps: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    for _ in range(steps):
        yield torch.randint(0, n, (min(n, size),), generator=generator)


def networks(dim: int, cfg: FedDiffConfig) -> tuple[WeightAE, LatentDenoiser]:
    return WeightAE(dim, latent=cfg.latent_channels), LatentDenoiser(cfg.latent_channels)


def _minimise(opt: torch.optim.Optimizer, batches: Iterable, loss_of: Callable[[Any], torch.Tensor]) -> float:
    """One optimizer step on ``loss_of(batch)`` per batch; the last loss."""
    loss = torch.zeros(())
    for batch in batches:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def train_autoencoder(
    ae: WeightAE, pool: torch.Tensor, cfg: FedDiffConfig, generator: torch.Generator
) -> float:
    """Eq. 6 on the normalised pool, with noise augmentation ξ_V on inputs and ξ_Z on latents."""

    def loss(idx: torch.Tensor) -> torch.Tensor:
        v = pool[idx]
        z = ae.encode(v + cfg.input_noise * torch.randn(v.shape, generator=generator))
        recon = ae.decode(z + cfg.latent_noise * torch.randn(z.shape, generator=generator))
        return ((v - recon) ** 2).mean()

    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=2e-6)
    return _minimise(opt, _batches(len(pool), 64, cfg.ae_steps, generator), loss)


def train_ldm(
    ldm: LatentDenoiser, latents: torch.Tensor, cfg: FedDiffConfig, generator: torch.Generator
) -> float:
    """Eq. 7 on the (scaled) pool latents Z⁰."""
    scheduler = ldm_scheduler(cfg.timesteps)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        z0 = latents[idx]
        eps = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, cfg.timesteps, (len(z0),), generator=generator)
        return ((eps - ldm(scheduler.add_noise(z0, eps, t), t)) ** 2).mean()

    opt = torch.optim.AdamW(ldm.parameters(), lr=cfg.lr, weight_decay=2e-6)
    return _minimise(opt, _batches(len(latents), 64, cfg.ldm_steps, generator), loss)


@torch.no_grad()
def reverse_chain(
    ldm: LatentDenoiser, z: torch.Tensor, steps: int, cfg: FedDiffConfig, generator: torch.Generator
) -> torch.Tensor:
    """Eq. 12: ``steps`` DDPM reverse steps t_r − 1 … 0 of the LDM starting from ``z``."""
    scheduler = ldm_scheduler(cfg.timesteps)
    scheduler.set_timesteps(cfg.timesteps)
    if cfg.renoise:
        eps = torch.randn(z.shape, generator=generator)
        z = scheduler.add_noise(z, eps, torch.full((len(z),), steps - 1))
    for t in scheduler.timesteps[cfg.timesteps - steps :]:
        z = scheduler.step(ldm(z, t), t, z, generator=generator).prev_sample
    return z


# ---------------------------------------------------------------------- the pre-trained weight space
@dataclass
class WeightSpace:
    """The pool and the networks trained on it; all the server needs to consolidate."""

    keys: list[str]
    mean: torch.Tensor  # (D,) pool mean
    scale: torch.Tensor  # () pool standard deviation
    latent_scale: torch.Tensor  # () standard deviation of the pool latents Z⁰
    pool: torch.Tensor  # (W, D) normalised pool, ordered by score
    scores: torch.Tensor  # (W,) proxy-set score of each pool entry (higher is better)
    ae: WeightAE
    ldm: LatentDenoiser

    def normalise(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.mean) / self.scale

    def denormalise(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.scale + self.mean

    def state_dict(self) -> dict[str, Any]:
        tensors = {k: getattr(self, k) for k in ("mean", "scale", "latent_scale", "pool", "scores")}
        return {"keys": list(self.keys), **tensors, "ae": self.ae.state_dict(), "ldm": self.ldm.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any], cfg: FedDiffConfig) -> WeightSpace:
        ae, ldm = networks(state["pool"].shape[1], cfg)
        ae.load_state_dict(state["ae"])
        ldm.load_state_dict(state["ldm"])
        tensors = {k: state[k] for k in ("mean", "scale", "latent_scale", "pool", "scores")}
        return cls(keys=list(state["keys"]), ae=ae, ldm=ldm, **tensors)

    @torch.no_grad()
    def pool_latents(self) -> torch.Tensor:
        return self.ae.encode(self.pool)


def pretrain_space(
    keys: list[str], vectors: torch.Tensor, scores: torch.Tensor, cfg: FedDiffConfig, seed: int
) -> tuple[WeightSpace, dict[str, float]]:
    """The autoencoder (eq. 6) and LDM (eq. 7) trained on the pool ``vectors`` (W × D)."""
    generator = torch_generator(seed, "feddiff-pretrain")
    order = torch.argsort(scores, stable=True)
    vectors, scores = vectors[order], scores[order]
    mean = vectors.mean(0)
    scale = (vectors - mean).std().clamp_min(1e-8)
    pool = (vectors - mean) / scale
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        ae, ldm = networks(pool.shape[1], cfg)
    ae_loss = train_autoencoder(ae, pool, cfg, generator)
    with torch.no_grad():
        latents = ae.encode(pool)
    latent_scale = latents.std().clamp_min(1e-8)
    ldm_loss = train_ldm(ldm, latents / latent_scale, cfg, generator)
    space = WeightSpace(keys, mean, scale, latent_scale, pool, scores, ae, ldm)
    return space, {"ae_loss": ae_loss, "ldm_loss": ldm_loss}


def finetune_encoder(
    space: WeightSpace, v: torch.Tensor, z_corr: torch.Tensor, cfg: FedDiffConfig, generator: torch.Generator
) -> float:
    """Eqs. 9–11 on the round's client vectors ``v``; the decoder stays fixed."""
    ae, sigma = space.ae, cfg.latent_noise

    def loss(_: int) -> torch.Tensor:
        mu = ae.encode(v)
        mu_s, var_s = consolidate(mu, torch.full_like(mu, sigma**2))
        z = mu_s + var_s.sqrt() * torch.randn(mu.shape, generator=generator)
        recon = ae.decode(mu + sigma * torch.randn(mu.shape, generator=generator))
        l_kl = ((v - recon) ** 2).mean() + cfg.kl_weight * kl_to_standard(mu_s, var_s)
        return l_kl + cfg.contrastive_weight * ((z_corr - z) ** 2).mean()

    ae.decoder.requires_grad_(False)
    try:
        opt = torch.optim.Adam(ae.encoder.parameters(), lr=cfg.encoder_lr)
        return _minimise(opt, range(cfg.encoder_steps), loss)
    finally:
        ae.decoder.requires_grad_(True)


# ---------------------------------------------------------------------- the strategy
Scorer = Callable[[Weights], float]


class FedDiff(Stateful):
    """A base Flower strategy for every parameter; the subset replaced by the consolidation.

    :meth:`attach` gives it the pre-trained :class:`WeightSpace` and the proxy-set scorer
    before round 1 (the server builds both: ``server/weight_pool.py``)."""

    def __init__(self, base: Stateful, cfg: FedDiffConfig, *, rounds: int, seed: int) -> None:
        self.base, self.cfg, self.rounds, self.seed = base, cfg, rounds, seed
        self.space: WeightSpace | None = None
        self.score: Scorer | None = None
        self.last: dict[str, float] = {}

    def attach(self, space: WeightSpace | None, score: Scorer) -> None:
        if space is not None:
            self.space = space
        self.score = score

    def begin_round(self, arrays: ArrayRecord) -> None:
        self.base.begin_round(arrays)

    def broadcast(self) -> dict[str, ArrayRecord]:
        return self.base.broadcast()

    def round_metrics(self) -> dict[str, Any]:
        return {"feddiff": dict(self.last)} if self.last else {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        arrays, metrics = self.base.aggregate_train(server_round, replies)
        if arrays is None:
            return None, None
        assert self.space is not None and self.score is not None, "attach must run before round 1"
        merged = arrays.to_torch_state_dict()
        keys = self.space.keys  # only the subset is decoded from each reply
        subsets = [{k: torch.from_numpy(r.content[ARRAYS][k].numpy()) for k in keys} for r in replies]
        clients = torch.stack([flatten(w, keys) for w in subsets])
        merged.update(self.consolidate(server_round, clients, merged))
        return ArrayRecord(merged), metrics

    def consolidate(self, round_: int, clients: torch.Tensor, merged: Weights) -> Weights:
        """Steps 2–5 of the round: the new subset given the clients' vectors (S × D)."""
        assert self.space is not None and self.score is not None
        space, cfg, start = self.space, self.cfg, time.perf_counter()
        generator = torch_generator(self.seed, "feddiff-round", round_)
        v = space.normalise(clients)
        base_score = self.score(merged)
        z_corr = space.pool_latents()[torch.argmin((space.scores - base_score).abs())]
        encoder_loss = finetune_encoder(space, v, z_corr, cfg, generator)
        t = denoise_steps(round_, self.rounds, cfg.t_final)
        with torch.no_grad():
            mu = space.ae.encode(v)
            mu_s, var_s = consolidate(mu, torch.full_like(mu, cfg.latent_noise**2))
            z_s = mu_s + var_s.sqrt() * torch.randn(mu.shape, generator=generator)
            z_0 = reverse_chain(space.ldm, z_s / space.latent_scale, t, cfg, generator) * space.latent_scale
            candidates = space.denormalise(space.ae.decode(z_0))
        subsets = [unflatten(c, merged, space.keys) for c in candidates]
        scores = [self.score({**merged, **s}) for s in subsets]
        best = max(range(len(scores)), key=scores.__getitem__)
        self.last = {
            "t": t, "score": scores[best], "base_score": base_score, "encoder_loss": encoder_loss,
            "server_s": time.perf_counter() - start,
        }  # fmt: skip
        return subsets[best]

    def state_dict(self) -> dict[str, Any]:
        space = None if self.space is None else self.space.state_dict()
        return {"base": self.base.state_dict(), "space": space}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"base", "space"}:
            raise ValueError(f"FedDiff state keys {sorted(state)} != expected ['base', 'space']")
        self.base.load_state_dict(state["base"])
        self.space = None if state["space"] is None else WeightSpace.from_state(state["space"], self.cfg)

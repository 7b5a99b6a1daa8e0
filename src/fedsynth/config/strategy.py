"""The server strategy's settings: ``[strategy]`` (which strategy) with one section per family
of strategies (``[strategy.fedopt]``, ``[strategy.krum]``, …) whose keys are the keywords its
constructor takes, and ``[feddiff]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsynth.config.fields import at_least as _at_least
from fedsynth.config.fields import choice as _choice

STRATEGY_NAMES = (
    "fedavg",
    "fedmedian",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "scaffold",
    "fedexp",
    "feddiff",
)


@dataclass(frozen=True)
class FedAvgMConfig:
    """FedAvgM (Hsu et al. 2019): server momentum; Flower's ``FedAvgM`` keywords."""

    server_learning_rate: float = _at_least(1.0, 0.0, exclusive=True)  # η
    server_momentum: float = _at_least(0.9, 0.0)  # β


@dataclass(frozen=True)
class FedOptConfig:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021); Flower's keywords (FedAdagrad has
    no betas)."""

    eta: float = _at_least(1e-2, 0.0, exclusive=True)  # server lr η
    eta_l: float = _at_least(1e-2, 0.0, exclusive=True)  # client lr, recorded only
    beta_1: float = _at_least(0.9, 0.0)
    beta_2: float = _at_least(0.99, 0.0)
    tau: float = _at_least(1e-3, 0.0, exclusive=True)


@dataclass(frozen=True)
class FedProxConfig:
    proximal_mu: float = _at_least(0.01, 0.0)  # μ


@dataclass(frozen=True)
class FedTrimmedAvgConfig:
    beta: float = _at_least(0.2, 0.0)  # fraction cut per side


@dataclass(frozen=True)
class KrumConfig:
    """Krum / MultiKrum / Bulyan (Blanchard et al. 2017, El Mhamdi et al. 2018)."""

    num_malicious_nodes: int = _at_least(0, 0)  # f
    num_nodes_to_select: int = _at_least(0, 0)  # MultiKrum m (0: n - f)


@dataclass(frozen=True)
class ScaffoldConfig:
    server_lr: float = _at_least(1.0, 0.0, exclusive=True)  # η_g


@dataclass(frozen=True)
class FedExPConfig:
    eps: float = _at_least(1e-3, 0.0, exclusive=True)  # ε


@dataclass(frozen=True)
class StrategyConfig:
    """The server strategy; each family's settings in its own section (``[strategy.fedopt]``),
    named as the strategy's constructor names them."""

    name: str = _choice("fedavg", STRATEGY_NAMES)
    class_aware: bool = False  # class-embedding rows averaged over the selected clients holding each class
    fedavgm: FedAvgMConfig = field(default_factory=FedAvgMConfig)
    fedopt: FedOptConfig = field(default_factory=FedOptConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    fedtrimmedavg: FedTrimmedAvgConfig = field(default_factory=FedTrimmedAvgConfig)
    krum: KrumConfig = field(default_factory=KrumConfig)
    scaffold: ScaffoldConfig = field(default_factory=ScaffoldConfig)
    fedexp: FedExPConfig = field(default_factory=FedExPConfig)


@dataclass(frozen=True)
class FedDiffConfig:
    """FedDiff (Li & Ping; ``strategy.name = "feddiff"``): a subset of the parameters is
    consolidated by a weight-space latent diffusion model pre-trained on the proxy set
    (Phoenix's shared set G: ``phoenix.beta`` > 0); ``strategies/feddiff.py``."""

    # every parameter first; server-side strategies only (SCAFFOLD and FedProx need their clients)
    base: str = _choice(
        "fedavg", tuple(n for n in STRATEGY_NAMES if n not in ("feddiff", "scaffold", "fedprox"))
    )
    subset: str = ""  # comma-separated parameter-name prefixes; "" = the model's last normalisation layer
    pool_runs: int = _at_least(4, 1)  # training runs on the proxy set, from the initial model
    pool_steps: int = _at_least(200, 1)  # optimizer steps per run
    pool_every: int = _at_least(10, 1)  # a pool entry every k steps
    ae_steps: int = _at_least(2000, 1)  # autoencoder pre-training (eq. 6)
    ldm_steps: int = _at_least(2000, 1)  # latent DDPM pre-training (eq. 7)
    lr: float = _at_least(1e-3, 0.0, exclusive=True)  # of both pre-trainings
    latent_channels: int = _at_least(4, 1)
    timesteps: int = _at_least(200, 1)  # T of the latent DDPM
    t_final: int = _at_least(20, 1)  # LDM steps in the last round (t_r ∝ r); the paper's reading: timesteps
    renoise: bool = False  # diffuse Z_s to step t_r before denoising (SDEdit) instead of starting at it
    encoder_steps: int = _at_least(10, 0)  # encoder fine-tuning per round (eqs. 9–11)
    encoder_lr: float = _at_least(1e-4, 0.0, exclusive=True)
    kl_weight: float = _at_least(1e-2, 0.0)  # α of eq. 9
    contrastive_weight: float = _at_least(0.1, 0.0)  # β of eq. 11
    input_noise: float = _at_least(0.01, 0.0)  # ξ_V
    latent_noise: float = _at_least(0.1, 0.0, exclusive=True)  # ξ_Z, also σ_i of eq. 8

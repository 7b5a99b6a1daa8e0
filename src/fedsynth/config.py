"""Typed run configuration, parsed once from TOML (+ ``--set`` overrides).

Every section is a frozen dataclass. Field metadata carries the valid ``choices``
and lower bounds (``min``); a wrong key or value raises :class:`ConfigError` with a
one-line message naming what is valid. Nothing else in the package holds defaults.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.errors import ConfigError


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: float | int, low: float | int, *, exclusive: bool = False) -> Any:
    return field(default=default, metadata={"min": low, "exclusive": exclusive})


PARADIGMS = ("centralized", "federated", "decentralized", "local")
DATASETS = ("digits", "imagefolder", "npz", "fashion-mnist", "idx")
PUBLIC_DATASETS = ("digits", "fashion-mnist")  # installed with the package: privacy.public_subspace
NATIVE_SIZE = {"fashion-mnist": 28, "idx": 28}  # data.image_size when not set (else 16)
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "class_disjoint", "quantity")
MODEL_PRESETS = ("tiny", "small", "base", "large")
SCHEDULES = ("linear", "cosine", "scaled_linear")
LOSSES = ("mse", "huber")
OPTIMIZERS = ("adam", "adamw", "sgd")
SAMPLERS = ("ddpm", "ddim", "dpm")
DEVICES = ("auto", "cpu", "cuda")
WEIGHTINGS = ("examples", "steps")
TRACKERS = ("none", "tensorboard", "mlflow")  # where per-round metrics also go (src/fedsynth/tracking.py)
ENGINES = ("superlink", "in-process")  # how `fedsynth run` simulates a federation
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
EXCHANGE_PLANS = ("full", "usplit", "udec", "ulatdec")
CODECS = ("fp32", "fp16", "bf16", "int8", "topk")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _choice("digits", DATASETS)
    path: str = ""
    image_size: int = _at_least(16, 4)
    channels: int = _at_least(0, 0)  # 0: as stored (digits: 1); 1 gray; 3 RGB
    test_fraction: float = _at_least(0.2, 0.0, exclusive=True)
    split_seed: int = 0  # fixed so every run is judged on the same held-out test split


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = _choice("iid", PARTITION_SCHEMES)
    num_clients: int = _at_least(8, 1)
    alpha: float = _at_least(0.5, 0.0, exclusive=True)
    classes_per_client: int = _at_least(2, 1)
    min_samples: int = _at_least(10, 0)


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _choice("small", MODEL_PRESETS)
    conditional: bool = True
    init: str = ""  # start from a fedsynth run, a UNet folder or a Stable-Diffusion pipeline folder
    prompt: str = "a photo of a {label}"  # a pipeline's class prompts ({label}: the class name)


LORA_AGGREGATIONS = ("fedavg", "ffa")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (Hu et al. 2022, via peft) on the denoiser: only they train and travel.
    ``aggregation``: "fedavg" trains A and B and averages each; "ffa" (FFA-LoRA, Sun et al.
    ICLR 2024) keeps A at its seeded shared initialisation and trains only B, so the average
    of the clients' B is exactly the average of their updates B·A."""

    rank: int = _at_least(0, 0)  # r; 0 = off
    alpha: float = _at_least(0.0, 0.0)  # scaling α (the update is α / r · B·A); 0 = r
    targets: str = ""  # module names (comma-separated); "" = attention projections and resnet convs
    aggregation: str = _choice("fedavg", LORA_AGGREGATIONS)


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = _at_least(1000, 2)
    schedule: str = _choice("linear", SCHEDULES)
    loss: str = _choice("mse", LOSSES)
    cfg_dropout: float = _at_least(0.1, 0.0)  # label dropout for classifier-free guidance
    ema_decay: float = _at_least(0.999, 0.0)
    clip_sample: bool = True  # clip x̂0 to [-1, 1] when sampling (pixel space); false for latent denoisers


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _at_least(1e-3, 0.0, exclusive=True)
    batch_size: int = _at_least(64, 1)
    local_steps: int = _at_least(50, 1)
    local_epochs: float = _at_least(0.0, 0.0)  # > 0 replaces local_steps
    optimizer: str = _choice("adamw", OPTIMIZERS)
    weight_decay: float = _at_least(0.0, 0.0)
    grad_clip: float = _at_least(1.0, 0.0)  # 0 disables
    device: str = _choice("auto", DEVICES)
    threads: int = _at_least(0, 0)  # 0: torch default
    keep_optimizer: bool = False  # federated clients keep their optimizer state (moments) across rounds
    trainable: str = ""  # modules that train (comma-separated names or patterns); the rest frozen


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = _at_least(10, 1)
    clients_per_round: int = _at_least(4, 1)
    checkpoint_every: int = _at_least(5, 1)
    min_clients: int = _at_least(1, 1)
    max_retries: int = _at_least(1, 0)  # re-selections when a round has < min_clients valid replies
    round_timeout: float = _at_least(600.0, 0.0, exclusive=True)
    weighting: str = _choice("examples", WEIGHTINGS)
    client_cpus: float = _at_least(1.0, 0.0, exclusive=True)
    client_gpus: float = _at_least(0.0, 0.0)
    server_ema_decay: float = _at_least(0.8, 0.0)  # per round (bench/server_ema.py); 0: last global model
    finetune_steps: int = _at_least(0, 0)  # >0: clients fine-tune the final model, synthetic = their mixture
    engine: str = _choice("superlink", ENGINES)  # `fedsynth run`: a local SuperLink, or in this process


@dataclass(frozen=True)
class StrategyConfig:
    name: str = _choice("fedavg", STRATEGY_NAMES)
    server_lr: float = _at_least(1.0, 0.0, exclusive=True)  # FedAvgM η
    momentum: float = _at_least(0.9, 0.0)  # FedAvgM β
    eta: float = _at_least(1e-2, 0.0, exclusive=True)  # FedOpt server lr η
    eta_l: float = _at_least(1e-2, 0.0, exclusive=True)  # FedOpt client lr (v0 init)
    beta_1: float = _at_least(0.9, 0.0)
    beta_2: float = _at_least(0.99, 0.0)
    tau: float = _at_least(1e-3, 0.0, exclusive=True)
    proximal_mu: float = _at_least(0.01, 0.0)  # FedProx μ
    trim_beta: float = _at_least(0.2, 0.0)  # FedTrimmedAvg β (fraction cut per side)
    num_malicious: int = _at_least(0, 0)  # Krum/MultiKrum/Bulyan f
    num_keep: int = _at_least(0, 0)  # MultiKrum m (0: n - f)
    fedexp_eps: float = _at_least(1e-3, 0.0, exclusive=True)  # FedExP ε
    class_aware: bool = False  # class-embedding rows averaged over the selected clients holding each class


@dataclass(frozen=True)
class ExchangeConfig:
    plan: str = _choice("full", EXCHANGE_PLANS)
    codec: str = _choice("fp32", CODECS)
    topk_ratio: float = _at_least(0.05, 0.0, exclusive=True)  # fraction of each tensor's entries kept
    personal: str = ""  # modules kept per client, never uploaded: "last-block" or "up_blocks.2,conv_out"


@dataclass(frozen=True)
class PhoenixConfig:
    """Phoenix (Jothiraj & Mashhadi 2024) remedies for non-IID data; 0 / "off" disables."""

    beta: float = _at_least(0.0, 0.0)  # shared set G: % of the clients' data, held by the server
    alpha: float = _at_least(100.0, 0.0)  # % of G merged into every client's data
    warmup_steps: int = _at_least(0, 0)  # server steps on G before round 1
    filter_from: int = _at_least(0, 0)  # threshold filtering from this round; 0 = off
    filter_mode: str = _choice("lowest", ("lowest", "threshold"))
    precision_threshold: float = _at_least(0.5, 0.0)  # mode "threshold": warn below this
    filter_samples: int = _at_least(64, 4)  # images each client generates to judge itself


@dataclass(frozen=True)
class CalibrationConfig:
    """FedDDPM (``always``) / FedDDPM+ (``stall``): server fine-tuning on an auxiliary set
    generated from the clients' one-off local models."""

    mode: str = _choice("off", ("off", "always", "stall"))
    pretrain_steps: int = _at_least(200, 1)  # each client's local model, before round 1
    aux_size: int = _at_least(500, 1)  # M: auxiliary images
    server_steps: int = _at_least(20, 1)  # S: fine-tuning steps per correction
    window: int = _at_least(3, 1)  # FedDDPM+: rounds over which progress is measured
    min_improvement: float = _at_least(0.02, 0.0)  # FedDDPM+: relative aux-loss drop below which it fires
    sampler_steps: int = _at_least(20, 1)  # DPM-Solver steps to generate the auxiliary set


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


@dataclass(frozen=True)
class LocalConfig:
    """Paradigm ``local``: every client trains its own model once; the synthetic set is drawn
    per class from the clients holding that class, in proportion to their counts."""

    steps: int = _at_least(0, 0)  # per client; 0: the federated run's compute spread over all clients
    upload: str = _choice("model", ("model", "samples"))  # what each client sends once
    ema_decay: float = _at_least(0.0, 0.0)  # one-off local models: EMA of their weights; 0 = last iterate


@dataclass(frozen=True)
class LedgerConfig:
    """Decentralized paradigm: the chain that coordinates rounds and the weight store."""

    rpc_url: str = ""  # JSON-RPC endpoint of an EVM node; "" = the embedded in-process chain
    keys_file: str = ""  # hex private keys, one a line (owner, trainers, aggregators); "" = dev mnemonic
    mnemonic: str = "test test test test test test test test test test test junk"  # dev accounts
    store: str = ""  # content store: "" = RUN_DIR/store, a directory, or an IPFS API URL (http://…)
    aggregators: int = _at_least(3, 1)  # aggregator nodes (all aggregate every round)
    update_timeout: float = _at_least(600.0, 0.0, exclusive=True)  # s: owner closes with what arrived
    aggregation_timeout: float = _at_least(300.0, 0.0, exclusive=True)  # s: no majority → round cancelled
    trainer_workers: int = _at_least(0, 0)  # parallel training processes; 0 = cpus / client_cpus
    nodes: str = _choice("simulated", ("simulated", "external"))  # external: `fedsynth node` processes
    join_timeout: float = _at_least(600.0, 0.0, exclusive=True)  # s to wait for external nodes to register


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy of each training party (docs/privacy.md)."""

    mode: str = _choice("none", ("none", "dp-sgd", "dp-fedavg"))
    max_grad_norm: float = _at_least(
        1.0, 0.0, exclusive=True
    )  # C: per example (dp-sgd), per client update (dp-fedavg)
    noise_multiplier: float = _at_least(0.0, 0.0)  # σ; 0 with target_epsilon: calibrated, recorded
    target_epsilon: float = _at_least(0.0, 0.0)  # ε budget of each party; the run stops before it
    delta: float = _at_least(0.0, 0.0)  # 0: 1 / (10 N) of each party's N examples
    accountant: str = _choice("rdp", ("rdp", "prv"))
    noise_multiplicity: int = _at_least(1, 1)  # DPDM: (t, ε) draws averaged per example before clipping
    clip_groups: str = ""  # "module=norm[:share],…": those parameters clipped and noised apart (dp-sgd)
    public_subspace: str = _choice("", ("", *PUBLIC_DATASETS))  # dp-sgd: project onto public gradients
    subspace_dim: int = _at_least(64, 1)  # k: the top-k directions of the public per-example gradients
    subspace_examples: int = _at_least(512, 2)  # public examples whose gradients give them


@dataclass(frozen=True)
class SampleConfig:
    per_class: int = _at_least(100, 0)
    sampler: str = _choice("ddim", SAMPLERS)
    steps: int = _at_least(50, 1)
    guidance: float = _at_least(1.0, 0.0)
    batch_size: int = _at_least(250, 1)
    grid_per_class: int = _at_least(10, 1)


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    classifier_epochs: int = _at_least(40, 1)
    cas_epochs: int = _at_least(40, 1)
    copy_ratio: float = _at_least(0.5, 0.0)  # memorisation: near-copy below this relative NN distance
    membership_samples: int = _at_least(500, 0)  # per side of the membership-inference audit; 0 = off
    tsne_points: int = _at_least(400, 0)  # per set (real, synthetic) in the t-SNE figure; 0 = none
    cache_dir: str = ""  # domain-classifier cache; "" = $FEDSYNTH_CACHE or ~/.cache/fedsynth
    inception_weights: str = ""  # local Inception-v3 weights file: adds standard FID and IS; "" = off


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""  # "" = a file store in the run directory (RUN/mlruns)
    experiment: str = "fedsynth"  # MLflow experiment the run is logged under


@dataclass(frozen=True)
class Config:
    seed: int = 0
    paradigm: str = _choice("centralized", PARADIGMS)
    task: str = _choice("diffusion", ("diffusion", "classifier"))  # what is trained (src/fedsynth/tasks.py)
    track: str = _choice("none", TRACKERS)  # also log metrics and sample grids to TensorBoard or MLflow
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    phoenix: PhoenixConfig = field(default_factory=PhoenixConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    feddiff: FedDiffConfig = field(default_factory=FedDiffConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    @property
    def trained_modules(self) -> str:
        """What trains, as a module list for :func:`trained_keys`: ``train.trainable``'s modules
        and, with LoRA on, the adapters (both factors; only B under FFA-LoRA). "" = everything."""
        if self.lora.rank == 0:
            return self.train.trainable
        adapters = "*.lora_B" if self.lora.aggregation == "ffa" else "*.lora_A,*.lora_B"
        return ",".join(part for part in (self.train.trainable, adapters) if part)

    def __post_init__(self) -> None:
        fed = self.federation
        if fed.clients_per_round > self.partition.num_clients:
            raise ConfigError(
                f"federation.clients_per_round ({fed.clients_per_round}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if fed.min_clients > fed.clients_per_round:
            raise ConfigError(
                f"federation.min_clients ({fed.min_clients}) exceeds "
                f"federation.clients_per_round ({fed.clients_per_round})"
            )
        if self.data.channels not in (0, 1, 3):
            raise ConfigError(
                f"data.channels = {self.data.channels} is not valid; choose 0 (as stored), 1 or 3"
            )
        if self.data.dataset not in ("digits", "fashion-mnist") and not self.data.path:
            raise ConfigError(f"data.path is required for data.dataset = {self.data.dataset!r}")
        if self.phoenix.beta > 100 or self.phoenix.alpha > 100:
            raise ConfigError("phoenix.beta and phoenix.alpha are percentages in [0, 100]")
        problem = (
            _privacy_problem(self)
            or _classifier_problem(self)
            or _feddiff_problem(self)
            or _lora_problem(self)
            or _latent_problem(self)
        )
        if problem:
            raise ConfigError(problem)
        if self.phoenix.warmup_steps and not self.phoenix.beta:
            raise ConfigError("phoenix.warmup_steps needs a shared set: set phoenix.beta > 0")
        for name, decay in (
            ("diffusion.ema_decay", self.diffusion.ema_decay),
            ("federation.server_ema_decay", fed.server_ema_decay),
            ("local.ema_decay", self.local.ema_decay),
        ):
            if decay >= 1:
                raise ConfigError(f"{name} = {decay} must be in [0, 1)")
        if self.exchange.topk_ratio > 1:
            raise ConfigError(f"exchange.topk_ratio = {self.exchange.topk_ratio} must be in (0, 1]")
        if self.paradigm == "decentralized":
            _check_decentralized(self)
        if fed.finetune_steps and (self.paradigm != "federated" or self.exchange.personal):
            raise ConfigError(
                "federation.finetune_steps needs paradigm = 'federated' without exchange.personal "
                f"(here paradigm = {self.paradigm!r}, exchange.personal = {self.exchange.personal!r})"
            )
        if fed.finetune_steps and self.privacy.mode == "dp-fedavg":
            raise ConfigError(
                "federation.finetune_steps is not available with privacy.mode = 'dp-fedavg': every "
                "fine-tuned client model leaves its holder on its own, outside the noised mean "
                "(use privacy.mode = 'dp-sgd', which accounts the fine-tuning steps)"
            )
        if self.paradigm == "local":
            _check_unsupported(self)
        mixture = self.paradigm == "local" or fed.finetune_steps
        if mixture and self.local.upload == "samples" and self.sample.per_class == 0:
            raise ConfigError("local.upload = 'samples' needs sample.per_class > 0: the clients send those")


def _unsupported(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """(value, the only supported value) of settings the decentralized and local paradigms lack."""
    return {
        "exchange.plan": (cfg.exchange.plan, "full"),
        "exchange.codec": (cfg.exchange.codec, "fp32"),
        "exchange.personal": (cfg.exchange.personal, ""),
        "calibration.mode": (cfg.calibration.mode, "off"),
        "phoenix.filter_from": (cfg.phoenix.filter_from, 0),
        "phoenix.warmup_steps": (cfg.phoenix.warmup_steps, 0),
        "strategy.class_aware": (cfg.strategy.class_aware, False),
    }


def _check_unsupported(cfg: Config) -> None:
    """What the decentralized and local paradigms do not support is refused, not ignored."""
    for key, (value, supported) in _unsupported(cfg).items():
        if value != supported:
            raise ConfigError(f"{key} = {value!r} is not available with paradigm = {cfg.paradigm!r}")


def _check_decentralized(cfg: Config) -> None:
    _check_unsupported(cfg)
    if cfg.strategy.name == "scaffold":
        raise ConfigError("strategy.name = 'scaffold' is not available with paradigm = 'decentralized'")
    if cfg.ledger.nodes == "external" and not cfg.ledger.rpc_url:
        raise ConfigError(
            "ledger.nodes = 'external' needs ledger.rpc_url: outside nodes cannot reach the in-process chain"
        )


# --------------------------------------------------------------------------- parsing


def _check_value(name: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    value = _coerce(name, hint, value)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid; choose one of: {', '.join(choices)}")
    low = f.metadata.get("min")
    if low is not None:
        bad = value <= low if f.metadata.get("exclusive") else value < low
        if bad or (isinstance(value, float) and not math.isfinite(value)):
            op = ">" if f.metadata.get("exclusive") else ">="
            raise ConfigError(f"{name} = {value!r} is not valid; it must be {op} {low}")
    return value


def _coerce(name: str, hint: Any, value: Any) -> Any:
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    check = ok.get(hint)
    if check is None:
        raise ConfigError(f"{name}: unsupported field type {hint!r}")
    if not check(value):
        raise ConfigError(f"{name} = {value!r} is not valid; expected {hint.__name__}")
    return float(value) if hint is float else value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "top level"
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} in {where}; valid keys: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a table [{name}], got {value!r}")
            kwargs[key] = _build(hint, value, name)
        else:
            kwargs[key] = _check_value(name, fields[key], hint, value)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, value_text = text.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = merged
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return merged


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def config_from_dict(raw: dict[str, Any]) -> Config:
    data = raw.get("data", {})
    if isinstance(data, dict) and "image_size" not in data and data.get("dataset") in NATIVE_SIZE:
        raw = {**raw, "data": {**data, "image_size": NATIVE_SIZE[data["dataset"]]}}
    return _build(Config, raw, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or nothing: all defaults), apply overrides, validate once."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


# Keys a resumed run may change: how long it runs and how it is run, sampled and judged —
# never what defines the training so far (data, model, optimiser, strategy, seed, …).
RESUMABLE = (
    "federation.rounds",
    "federation.checkpoint_every",
    "federation.round_timeout",
    "federation.min_clients",
    "federation.max_retries",
    "federation.client_cpus",
    "federation.client_gpus",
    "federation.engine",
    "train.device",
    "train.threads",
    "ledger.rpc_url",
    "ledger.join_timeout",
    "ledger.update_timeout",
    "ledger.aggregation_timeout",
    "ledger.trainer_workers",
    "sample.",
    "eval.",
    "track",
    "mlflow.",
)


def flat_items(cfg: Config) -> dict[str, Any]:
    """``section.key`` → value for every setting."""
    out: dict[str, Any] = {}
    for key, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _privacy_problem(cfg: Config) -> str | None:
    p = cfg.privacy
    for setting in ("clip_groups", "public_subspace"):
        if getattr(p, setting) and p.mode != "dp-sgd":
            return f"privacy.{setting} applies to privacy.mode = 'dp-sgd', not {p.mode!r}"
    if p.mode == "none":
        return None
    if p.noise_multiplier <= 0 and p.target_epsilon <= 0:
        return f"privacy.mode = {p.mode!r} needs privacy.target_epsilon (σ is calibrated) or noise_multiplier"
    if p.delta >= 1:
        return f"privacy.delta = {p.delta} must be below 1 (0: 1 / (10 N))"
    if p.mode == "dp-fedavg":
        return _client_level_problem(cfg)
    if cfg.paradigm not in ("centralized", "federated"):
        return (
            f"privacy.mode = 'dp-sgd' runs in the centralized and federated paradigms, not {cfg.paradigm!r}"
        )
    if cfg.strategy.name in ("fedprox", "scaffold") and cfg.paradigm == "federated":
        name = cfg.strategy.name
        return (
            f"privacy.mode = 'dp-sgd' does not combine with strategy {name!r} (it edits the clipped gradient)"
        )
    if cfg.train.local_epochs > 0:
        return "privacy.mode = 'dp-sgd' counts steps: use train.local_steps, not train.local_epochs"
    if p.public_subspace and p.public_subspace == cfg.data.dataset:
        return (
            f"privacy.public_subspace = {p.public_subspace!r} is the training data's own dataset: "
            "the subspace must come from other, public images"
        )
    if p.public_subspace and p.subspace_dim > p.subspace_examples:
        k, n = p.subspace_dim, p.subspace_examples
        return f"privacy.subspace_dim = {k} exceeds privacy.subspace_examples = {n}"
    parse_clip_groups(p.clip_groups)
    return None


def under_module(key: str, pattern: str) -> bool:
    """Whether parameter ``key`` is, or lies under, the module a name setting gives
    (``exchange.personal``, ``feddiff.subset``, ``privacy.clip_groups``, ``train.trainable``):
    ``pattern`` or ``pattern.…``, where ``pattern`` may hold shell wildcards (``*.time_emb_proj``)."""
    return fnmatchcase(key, pattern) or fnmatchcase(key, pattern + ".*")


def module_list(text: str) -> list[str]:
    """A comma-separated setting of module names or patterns as a list, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def keys_under(keys: Iterable[str], patterns: list[str], setting: str) -> list[str]:
    """The parameter keys under any of ``patterns`` (``under_module``), in their order; a
    pattern matching none is a ConfigError naming ``setting``."""
    keys = list(keys)
    for pattern in patterns:
        if not any(under_module(k, pattern) for k in keys):
            raise ConfigError(f"{setting}: {pattern!r} matches no parameter of the model")
    return [k for k in keys if any(under_module(k, p) for p in patterns)]


def trained_keys(trainable: str, keys: Iterable[str]) -> list[str]:
    """``train.trainable``: the keys that train, those under its modules (``keys_under``), or
    every key when it names none."""
    keys = list(keys)
    patterns = module_list(trainable)
    return keys_under(keys, patterns, "train.trainable") if patterns else keys


def parse_clip_groups(text: str) -> dict[str, tuple[float, float | None]]:
    """``privacy.clip_groups`` ("class_embedding=0.005:0.2,*.time_emb_proj=0.03") as
    {module pattern: (clipping norm C_G, share s_G of the noise budget or None)}: norms positive, shares
    in (0, 1) summing below 1 (the groups without one, the other parameters' included, split
    what is left evenly; checked against the model in ``privacy.dpsgd.clip_groups``)."""
    groups: dict[str, tuple[float, float | None]] = {}
    for item in module_list(text):
        pattern, _, value = (s.strip() for s in item.partition("="))
        norm_text, _, share_text = value.partition(":")
        norm, share = _float_or_nan(norm_text), _float_or_nan(share_text) if share_text else None
        bad_share = share is not None and not 0 < share < 1
        if not pattern or pattern in groups or not 0 < norm < math.inf or bad_share:
            raise ConfigError(
                f"privacy.clip_groups: {item!r} is not valid; write distinct module=norm or "
                "module=norm:share items (norm > 0, share in (0, 1)), e.g. 'class_embedding=0.005:0.2'"
            )
        groups[pattern] = (norm, share)
    total = sum(share for _, share in groups.values() if share is not None)
    if total >= 1:
        raise ConfigError(f"privacy.clip_groups: the shares sum to {total:g}; leave some to the rest")
    return groups


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _classifier_problem(cfg: Config) -> str | None:
    """Task ``classifier`` trains the domain-classifier CNN over the federated paradigm with
    every strategy; what only makes sense for a denoiser is refused."""
    if cfg.task != "classifier":
        return None
    if cfg.paradigm != "federated":
        return f"task = 'classifier' runs in the federated paradigm, not {cfg.paradigm!r}"
    # what the decentralized and local paradigms lack, but codecs (they compress any weights)
    denoiser_only = {k: v for k, v in _unsupported(cfg).items() if k != "exchange.codec"}
    denoiser_only["federation.finetune_steps"] = (cfg.federation.finetune_steps, 0)
    denoiser_only["model.init"] = (cfg.model.init, "")
    for key, (value, supported) in denoiser_only.items():
        if value != supported:
            return f"{key} = {value!r} is not available with task = 'classifier' (it is the denoiser's)"
    if cfg.privacy.mode == "dp-sgd":
        return "privacy.mode = 'dp-sgd' is not available with task = 'classifier' (use 'dp-fedavg')"
    return None


def _lora_problem(cfg: Config) -> str | None:
    lora = cfg.lora
    if lora.rank == 0:
        changed = lora.targets or lora.alpha or lora.aggregation != "fedavg"
        return "lora.targets, lora.alpha and lora.aggregation need lora.rank > 0" if changed else None
    if cfg.task == "classifier":
        return "lora.rank > 0 is not available with task = 'classifier' (adapters are the denoiser's)"
    if cfg.strategy.name == "feddiff":
        return "lora.rank > 0 does not combine with strategy.name = 'feddiff' (it reads whole uploads)"
    return None


def is_pipeline_folder(path: str) -> bool:
    """Whether ``model.init`` names a diffusers pipeline folder (a latent denoiser's base)."""
    return bool(path) and (Path(path) / "model_index.json").is_file()


def _latent_problem(cfg: Config) -> str | None:
    """A latent base (a Stable-Diffusion pipeline folder in ``model.init``): what samples or
    judges images inside a round is not available, and latents are never clipped."""
    if not is_pipeline_folder(cfg.model.init):
        return None
    refused = {
        "calibration.mode": (cfg.calibration.mode, "off"),
        "phoenix.filter_from": (cfg.phoenix.filter_from, 0),
        "privacy.public_subspace": (cfg.privacy.public_subspace, ""),
        "diffusion.clip_sample": (cfg.diffusion.clip_sample, False),
    }
    for key, (value, supported) in refused.items():
        if value != supported:
            return f"{key} = {value!r} is not available with a pipeline in model.init (use {supported!r})"
    if "{label}" not in cfg.model.prompt:
        return f"model.prompt = {cfg.model.prompt!r} must hold {{label}} (where the class name goes)"
    return None


def _feddiff_problem(cfg: Config) -> str | None:
    """FedDiff needs the proxy set on the server and one aggregation unit holding every parameter."""
    if cfg.strategy.name != "feddiff":
        return None
    if cfg.paradigm != "federated":
        return f"strategy.name = 'feddiff' runs in the federated paradigm, not {cfg.paradigm!r}"
    if cfg.phoenix.beta <= 0:
        return "strategy.name = 'feddiff' needs a proxy set on the server: set phoenix.beta > 0 (e.g. 4)"
    if cfg.exchange.plan != "full" or cfg.exchange.personal or cfg.train.trainable:
        return (
            "strategy.name = 'feddiff' needs exchange.plan = 'full' without exchange.personal or "
            "train.trainable (it reads its subset from every client's whole upload)"
        )
    fd = cfg.feddiff
    if fd.pool_every > fd.pool_steps:
        return f"feddiff.pool_every = {fd.pool_every} exceeds feddiff.pool_steps = {fd.pool_steps}"
    if fd.t_final > fd.timesteps:
        return f"feddiff.t_final = {fd.t_final} exceeds feddiff.timesteps = {fd.timesteps}"
    return None


# strategies whose aggregate is a weighted mean followed by a server optimizer: with
# dp-fedavg they receive the noised mean as their only reply (privacy/client_level.py)
CLIENT_LEVEL_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox")


def _client_level_problem(cfg: Config) -> str | None:
    if cfg.paradigm != "federated":
        return f"privacy.mode = 'dp-fedavg' runs in the federated paradigm, not {cfg.paradigm!r}"
    if cfg.strategy.name not in CLIENT_LEVEL_STRATEGIES:
        return (
            f"privacy.mode = 'dp-fedavg' needs a mean-based strategy ({', '.join(CLIENT_LEVEL_STRATEGIES)}), "
            f"not {cfg.strategy.name!r}"
        )
    if cfg.exchange.plan != "full" or cfg.calibration.mode != "off" or cfg.phoenix.filter_from:
        return "privacy.mode = 'dp-fedavg' needs exchange.plan = 'full', no calibration and no filtering"
    if cfg.strategy.class_aware:
        return "privacy.mode = 'dp-fedavg' does not combine with strategy.class_aware (per-client rows)"
    return None


def check_resume_changes(saved: Config, wanted: Config) -> list[str]:
    """The keys ``wanted`` changes; a one-line error when one of them may not change on resume."""
    old, new = flat_items(saved), flat_items(wanted)
    changed = [k for k in new if new[k] != old.get(k)]
    for key in changed:
        if not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            raise ConfigError(
                f"--resume cannot change {key} (the run was trained with {old.get(key)!r}); "
                "start a new run with --out for that"
            )
    return changed


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_toml(cfg: Config) -> str:
    """The resolved config as TOML text (``config.toml``; written by ``RunDir.write_config``)."""
    return tomli_w.dumps(config_to_dict(cfg))


__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_toml",
    "load_config",
    "parse_override",
]

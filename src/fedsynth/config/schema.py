"""The configuration schema: every section a frozen dataclass whose fields carry their
defaults, valid ``choices`` and lower bounds (``min``). Nothing else in the package holds
defaults; :mod:`fedsynth.config.rules` checks combinations when a :class:`Config` is built,
:mod:`fedsynth.config.parsing` reads TOML into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsynth.config.fields import at_least as _at_least
from fedsynth.config.fields import choice as _choice
from fedsynth.config.strategy import FedDiffConfig, StrategyConfig

PARADIGMS = ("centralized", "federated", "decentralized", "local")
DATASETS = ("digits", "imagefolder", "npz", "fashion-mnist", "idx")
PUBLIC_DATASETS = ("digits", "fashion-mnist")  # installed with the package: privacy.public_subspace
NATIVE_SIZE = {"fashion-mnist": 28, "idx": 28}  # data.image_size when not set (else 16)
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "class_disjoint", "quantity")
MODEL_PRESETS = ("tiny", "small", "base", "large")
BASE_DTYPES = ("float32", "bfloat16", "float16")  # model.base_dtype
SCHEDULES = ("linear", "cosine", "scaled_linear")
LOSSES = ("mse", "huber")
OPTIMIZERS = ("adam", "adamw", "sgd")
SAMPLERS = ("ddpm", "ddim", "dpm")
DEVICES = ("auto", "cpu", "cuda")
WEIGHTINGS = ("examples", "steps")
TRACKERS = (
    "none",
    "tensorboard",
    "mlflow",
)  # where per-round metrics also go (src/fedsynth/stages/tracking.py)
ENGINES = ("superlink", "in-process")  # how `fedsynth run` simulates a federation
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
    # a pipeline's frozen UNet weights; adapters stay float32
    base_dtype: str = _choice("float32", BASE_DTYPES)


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
    task: str = _choice("diffusion", ("diffusion", "classifier"))  # what is trained (training/tasks.py)
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
        from fedsynth.config.rules import check  # the rules read the schema's types

        check(self)

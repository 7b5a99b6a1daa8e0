"""Which settings combine: every rule a one-line :class:`ConfigError`, checked when a
:class:`~fedsynth.config.schema.Config` is built (its ``__post_init__`` calls :func:`check`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsynth.config.matchers import parse_clip_groups
from fedsynth.config.schema import Config
from fedsynth.core.errors import ConfigError


def check(cfg: Config) -> None:
    """Raise :class:`ConfigError` for the first rule ``cfg`` breaks."""
    fed = cfg.federation
    if fed.clients_per_round > cfg.partition.num_clients:
        raise ConfigError(
            f"federation.clients_per_round ({fed.clients_per_round}) exceeds "
            f"partition.num_clients ({cfg.partition.num_clients})"
        )
    if fed.min_clients > fed.clients_per_round:
        raise ConfigError(
            f"federation.min_clients ({fed.min_clients}) exceeds "
            f"federation.clients_per_round ({fed.clients_per_round})"
        )
    if cfg.data.channels not in (0, 1, 3):
        raise ConfigError(f"data.channels = {cfg.data.channels} is not valid; choose 0 (as stored), 1 or 3")
    if cfg.data.dataset not in ("digits", "fashion-mnist") and not cfg.data.path:
        raise ConfigError(f"data.path is required for data.dataset = {cfg.data.dataset!r}")
    if cfg.phoenix.beta > 100 or cfg.phoenix.alpha > 100:
        raise ConfigError("phoenix.beta and phoenix.alpha are percentages in [0, 100]")
    problem = (
        _privacy_problem(cfg)
        or _classifier_problem(cfg)
        or _feddiff_problem(cfg)
        or _lora_problem(cfg)
        or _latent_problem(cfg)
        or _base_dtype_problem(cfg)
    )
    if problem:
        raise ConfigError(problem)
    if cfg.phoenix.warmup_steps and not cfg.phoenix.beta:
        raise ConfigError("phoenix.warmup_steps needs a shared set: set phoenix.beta > 0")
    for name, decay in (
        ("diffusion.ema_decay", cfg.diffusion.ema_decay),
        ("federation.server_ema_decay", fed.server_ema_decay),
        ("local.ema_decay", cfg.local.ema_decay),
    ):
        if decay >= 1:
            raise ConfigError(f"{name} = {decay} must be in [0, 1)")
    if cfg.exchange.topk_ratio > 1:
        raise ConfigError(f"exchange.topk_ratio = {cfg.exchange.topk_ratio} must be in (0, 1]")
    if cfg.paradigm == "decentralized":
        _check_decentralized(cfg)
    if fed.finetune_steps and (cfg.paradigm != "federated" or cfg.exchange.personal):
        raise ConfigError(
            "federation.finetune_steps needs paradigm = 'federated' without exchange.personal "
            f"(here paradigm = {cfg.paradigm!r}, exchange.personal = {cfg.exchange.personal!r})"
        )
    if fed.finetune_steps and cfg.privacy.mode == "dp-fedavg":
        raise ConfigError(
            "federation.finetune_steps is not available with privacy.mode = 'dp-fedavg': every "
            "fine-tuned client model leaves its holder on its own, outside the noised mean "
            "(use privacy.mode = 'dp-sgd', which accounts the fine-tuning steps)"
        )
    if cfg.paradigm == "local":
        _check_unsupported(cfg)
    mixture = cfg.paradigm == "local" or fed.finetune_steps
    if mixture and cfg.local.upload == "samples" and cfg.sample.per_class == 0:
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


def _base_dtype_problem(cfg: Config) -> str | None:
    """A half-precision base holds only frozen weights: LoRA trains, nothing else does."""
    dtype, init = cfg.model.base_dtype, cfg.model.init
    if dtype == "float32":
        return None
    if not is_pipeline_folder(init):  # a folder not there yet is reported when the model is built
        if init and not Path(init).exists():
            return None
        return (
            f"model.base_dtype = {dtype!r} needs a pipeline folder in model.init (the frozen base it holds)"
        )
    if cfg.lora.rank == 0 or cfg.train.trainable:
        return (
            f"model.base_dtype = {dtype!r} needs lora.rank > 0 and no train.trainable (only adapters train)"
        )
    if cfg.privacy.mode == "dp-sgd":
        return f"model.base_dtype = {dtype!r} is not available with privacy.mode = 'dp-sgd' (use 'float32')"
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

"""Server strategies, selected by ``strategy.name`` from this explicit registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsynth.config import STRATEGY_NAMES, Config
from fedsynth.core.errors import ConfigError
from fedsynth.strategies import flower
from fedsynth.strategies.feddiff import FedDiff
from fedsynth.strategies.fedexp import FedExP
from fedsynth.strategies.scaffold import Scaffold
from fedsynth.strategies.state import Stateful

WEIGHT_KEYS = {"examples": "num-examples", "steps": "num-steps"}


def _fedopt(cls: type) -> Callable[[Config, dict], Stateful]:
    def build(cfg: Config, common: dict) -> Stateful:
        s = cfg.strategy
        return cls(eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **common)

    return build


def _bulyan(cfg: Config, common: dict) -> Stateful:
    f, n = cfg.strategy.num_malicious, cfg.federation.clients_per_round
    if n < 4 * f + 3:
        raise ConfigError(f"bulyan needs clients_per_round >= 4 * num_malicious + 3 = {4 * f + 3}, got {n}")
    return flower.Bulyan(num_malicious_nodes=f, **common)


def _multikrum(cfg: Config, common: dict) -> Stateful:
    s, n = cfg.strategy, cfg.federation.clients_per_round
    keep = s.num_keep or n - s.num_malicious
    if not 1 <= keep <= n:
        raise ConfigError(f"strategy.num_keep = {keep} must be between 1 and clients_per_round = {n}")
    return flower.MultiKrum(num_malicious_nodes=s.num_malicious, num_nodes_to_select=keep, **common)


def _trimmed(cfg: Config, common: dict) -> Stateful:
    if not 0.0 <= cfg.strategy.trim_beta < 0.5:
        raise ConfigError(f"strategy.trim_beta = {cfg.strategy.trim_beta} must be in [0, 0.5)")
    return flower.FedTrimmedAvg(beta=cfg.strategy.trim_beta, **common)


STRATEGIES: dict[str, Callable[[Config, dict], Stateful]] = {
    "fedavg": lambda cfg, common: flower.FedAvg(**common),
    "fedmedian": lambda cfg, common: flower.FedMedian(**common),
    "fedavgm": lambda cfg, common: flower.FedAvgM(
        server_learning_rate=cfg.strategy.server_lr, server_momentum=cfg.strategy.momentum, **common
    ),
    "fedadam": _fedopt(flower.FedAdam),
    "fedyogi": _fedopt(flower.FedYogi),
    "fedadagrad": lambda cfg, common: flower.FedAdagrad(
        eta=cfg.strategy.eta, eta_l=cfg.strategy.eta_l, tau=cfg.strategy.tau, **common
    ),
    "fedprox": lambda cfg, common: flower.FedProx(proximal_mu=cfg.strategy.proximal_mu, **common),
    "fedtrimmedavg": _trimmed,
    "krum": lambda cfg, common: flower.Krum(num_malicious_nodes=cfg.strategy.num_malicious, **common),
    "multikrum": _multikrum,
    "bulyan": _bulyan,
    "scaffold": lambda cfg, common: Scaffold(
        num_clients=cfg.partition.num_clients, server_lr=cfg.strategy.server_lr, **common
    ),
    "fedexp": lambda cfg, common: FedExP(eps=cfg.strategy.fedexp_eps, **common),
    "feddiff": lambda cfg, common: FedDiff(
        STRATEGIES[cfg.feddiff.base](cfg, common), cfg.feddiff, rounds=cfg.federation.rounds, seed=cfg.seed
    ),
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "registry and config choices must agree"


def build_strategy(cfg: Config) -> Any:
    """The strategy named by ``cfg.strategy.name``, configured from ``cfg.strategy``."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name = {name!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    common = {
        "weighted_by_key": WEIGHT_KEYS[cfg.federation.weighting],
        "min_train_nodes": 1,
        "min_available_nodes": 1,
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
    }
    return STRATEGIES[name](cfg, common)

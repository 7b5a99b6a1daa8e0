"""Server strategies, selected by ``strategy.name`` from this explicit registry."""

from __future__ import annotations

import dataclasses
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
Builder = Callable[[Config, dict], Stateful]


def _fedopt(cls: type, keys: tuple[str, ...] = ("eta", "eta_l", "beta_1", "beta_2", "tau")) -> Builder:
    def build(cfg: Config, common: dict) -> Stateful:
        section = dataclasses.asdict(cfg.strategy.fedopt)
        return cls(**{k: section[k] for k in keys}, **common)

    return build


def _bulyan(cfg: Config, common: dict) -> Stateful:
    f, n = cfg.strategy.krum.num_malicious_nodes, cfg.federation.clients_per_round
    if n < 4 * f + 3:
        raise ConfigError(
            f"bulyan needs clients_per_round >= 4 * num_malicious_nodes + 3 = {4 * f + 3}, got {n}"
        )
    return flower.Bulyan(num_malicious_nodes=f, **common)


def _multikrum(cfg: Config, common: dict) -> Stateful:
    s, n = cfg.strategy.krum, cfg.federation.clients_per_round
    keep = s.num_nodes_to_select or n - s.num_malicious_nodes
    if not 1 <= keep <= n:
        raise ConfigError(
            f"strategy.krum.num_nodes_to_select = {keep} must be between 1 and clients_per_round = {n}"
        )
    return flower.MultiKrum(num_malicious_nodes=s.num_malicious_nodes, num_nodes_to_select=keep, **common)


def _trimmed(cfg: Config, common: dict) -> Stateful:
    beta = cfg.strategy.fedtrimmedavg.beta
    if not 0.0 <= beta < 0.5:
        raise ConfigError(f"strategy.fedtrimmedavg.beta = {beta} must be in [0, 0.5)")
    return flower.FedTrimmedAvg(beta=beta, **common)


def _section(cls: type, name: str) -> Builder:
    """``cls`` built from ``[strategy.<name>]``: the section's keys are its keywords."""
    return lambda cfg, common: cls(**dataclasses.asdict(getattr(cfg.strategy, name)), **common)


STRATEGIES: dict[str, Builder] = {
    "fedavg": lambda cfg, common: flower.FedAvg(**common),
    "fedmedian": lambda cfg, common: flower.FedMedian(**common),
    "fedavgm": _section(flower.FedAvgM, "fedavgm"),
    "fedadam": _fedopt(flower.FedAdam),
    "fedyogi": _fedopt(flower.FedYogi),
    "fedadagrad": _fedopt(flower.FedAdagrad, ("eta", "eta_l", "tau")),
    "fedprox": _section(flower.FedProx, "fedprox"),
    "fedtrimmedavg": _trimmed,
    "krum": lambda cfg, common: flower.Krum(
        num_malicious_nodes=cfg.strategy.krum.num_malicious_nodes, **common
    ),
    "multikrum": _multikrum,
    "bulyan": _bulyan,
    "scaffold": lambda cfg, common: Scaffold(
        num_clients=cfg.partition.num_clients, server_lr=cfg.strategy.scaffold.server_lr, **common
    ),
    "fedexp": _section(FedExP, "fedexp"),
    "feddiff": lambda cfg, common: FedDiff(
        STRATEGIES[cfg.feddiff.base](cfg, common), cfg.feddiff, rounds=cfg.federation.rounds, seed=cfg.seed
    ),
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "registry and config choices must agree"


def build_strategy(cfg: Config) -> Any:
    """The strategy named by ``cfg.strategy.name``, configured from its ``[strategy.<family>]``."""
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

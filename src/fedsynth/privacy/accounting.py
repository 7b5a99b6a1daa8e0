"""(ε, δ) of DP-SGD with Poisson sampling, and the noise that meets a target ε.

A party (the centralized trainer, or one federated client) that ran ``steps`` DP-SGD steps
with noise multiplier σ and sampling rate q = batch_size / N on its N examples has spent
ε(δ) of the subsampled Gaussian mechanism composed ``steps`` times — computed by Opacus'
accountants (``rdp``: Rényi DP, Mironov 2017 / Mironov et al. 2019; ``prv``: privacy loss
random variables, Gopi et al. 2021). δ defaults to 1 / (10 N).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant

from fedsynth.config import Config, PrivacyConfig
from fedsynth.core.errors import ConfigError, FedsynthError
from fedsynth.core.protocol import UpdateInfo

RDP_ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, *range(64, 1025, 8)]
History = list[tuple[float, float, int]]  # (σ, q, steps) segments, in Opacus' layout


class PrivacyBudgetError(FedsynthError):
    """Training further would spend more than ``privacy.target_epsilon``."""


def sampling_rate(batch_size: int, num_examples: int) -> float:
    return min(1.0, batch_size / num_examples)


def default_delta(privacy: PrivacyConfig, num_examples: int) -> float:
    return privacy.delta if privacy.delta > 0 else 1.0 / (10 * num_examples)


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε spent after the DP-SGD steps in ``history``; 0 before any step."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    if accountant == "rdp":  # orders past Opacus' 63 too: short, low-noise runs need them
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS))
    return float(acc.get_epsilon(delta=delta))


def calibrate(target_epsilon: float, delta: float, q: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest σ (bisection to 0.1% of σ) with ε(σ, q, steps, δ) ≤ target, by the same
    accountant that reports ε."""
    lo, hi = 0.0, 1.0
    while epsilon([(hi, q, steps)], delta, accountant) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ConfigError(
                f"privacy.target_epsilon = {target_epsilon} cannot be met at q = {q:.3g}, {steps} steps"
            )
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon([(mid, q, steps)], delta, accountant) > target_epsilon else (lo, mid)
    return hi


def planned_steps(cfg: Config, central_steps_per_round: int) -> int:
    """Steps a party may take over the whole run: every round (a federated client selected
    every round is the worst case the noise is calibrated for), then its
    ``federation.finetune_steps``."""
    if cfg.paradigm == "centralized":
        return cfg.federation.rounds * central_steps_per_round
    return cfg.federation.rounds * cfg.train.local_steps + cfg.federation.finetune_steps


def resolve_noise(cfg: Config, sizes: list[int], central_steps_per_round: int) -> Config:
    """``cfg`` with ``privacy.noise_multiplier`` set from ``privacy.target_epsilon`` for the
    party that needs the most noise (the smallest N: the largest q, and its δ), recorded in
    the run's config.toml so that a resumed run keeps the same σ."""
    p = cfg.privacy
    if p.mode == "none" or p.noise_multiplier > 0:
        return cfg
    if p.mode == "dp-fedavg":  # one release per round, no amplification
        n = cfg.partition.num_clients
        sigma = calibrate(p.target_epsilon, default_delta(p, n), 1.0, cfg.federation.rounds, p.accountant)
        return dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=round(sigma, 6)))
    n = min(sizes)
    steps = planned_steps(cfg, central_steps_per_round)
    sigma = calibrate(
        p.target_epsilon, default_delta(p, n), sampling_rate(cfg.train.batch_size, n), steps, p.accountant
    )
    return dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=round(sigma, 6)))


@dataclass
class PrivacyLedger:
    """Per party: DP-SGD steps taken and data size; ε of each after every round. A round hook
    in the federated paradigm (name ``privacy``), stepped directly by the centralized one."""

    privacy: PrivacyConfig
    batch_size: int
    steps: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    name: str = "privacy"

    def record(self, party: str, steps: int, num_examples: int) -> None:
        self.steps[party] = self.steps.get(party, 0) + steps
        self.sizes[party] = num_examples

    def epsilon_of(self, party: str, extra_steps: int = 0) -> float:
        n = self.sizes[party]
        q = sampling_rate(self.batch_size, n)
        history = [(self.privacy.noise_multiplier, q, self.steps.get(party, 0) + extra_steps)]
        return epsilon(history, default_delta(self.privacy, n), self.privacy.accountant)

    def report(self) -> dict[str, Any]:
        """``epsilon`` per party and the largest, for the round's metrics line."""
        per_party = {p: round(self.epsilon_of(p), 4) for p in sorted(self.steps)}
        return {"epsilon": per_party, "epsilon_max": max(per_party.values(), default=0.0)}

    def check_next(self, party: str, steps: int, round_: int) -> None:
        """Stop before ``party``'s next ``steps`` would take it past ``privacy.target_epsilon``."""
        target = self.privacy.target_epsilon
        if target <= 0 or party not in self.sizes:
            return
        after = self.epsilon_of(party, steps)
        if after > target + 0.01:
            raise PrivacyBudgetError(
                f"round {round_} would take {party} to ε = {after:.2f} > privacy.target_epsilon = {target}; "
                "the run stops here with its checkpoints (sample from the last model, or start a new run)"
            )

    def check_round(self, round_: int, selected: list[int], steps: int) -> None:
        for pid in selected:
            self.check_next(f"client {pid}", steps, round_)

    def after_aggregate(self, round_: int, updates: list) -> dict[str, Any]:
        return self.after_steps([u.info for u in updates])

    def after_steps(self, infos: Iterable[UpdateInfo]) -> dict[str, Any]:
        """Record the DP-SGD steps the clients report (a round, or the fine-tuning round)."""
        for info in infos:
            self.record(f"client {info.client}", info.num_steps, info.num_examples)
        return self.report()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps), "sizes": dict(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.sizes = dict(state["steps"]), dict(state["sizes"])


class ClientLevelLedger(PrivacyLedger):
    """DP-FedAvg's ledger: one party (every client, user-level), one release per round at
    sampling rate 1 (``batch_size`` = N = the number of clients); δ defaults to 1 / (10 N)."""

    party = "clients (user-level)"

    def __init__(self, privacy: PrivacyConfig, num_clients: int) -> None:
        super().__init__(privacy, batch_size=num_clients)
        self.num_clients = num_clients

    def check_round(self, round_: int, selected: list[int], steps: int) -> None:
        self.check_next(self.party, 1, round_)

    def after_aggregate(self, round_: int, updates: list) -> dict[str, Any]:
        self.record(self.party, 1, self.num_clients)
        return self.report()


def privacy_ledger(cfg: Config) -> PrivacyLedger | None:
    """The federated server's ledger for ``privacy.mode`` (None without DP)."""
    if cfg.privacy.mode == "dp-sgd":
        return PrivacyLedger(cfg.privacy, cfg.train.batch_size)
    if cfg.privacy.mode == "dp-fedavg":
        return ClientLevelLedger(cfg.privacy, cfg.partition.num_clients)
    return None

"""FedExP (Jhunjhunwala, Wang & Joshi, ICLR 2023, Algorithm 1): a server step size set by the
geometry of the round's updates, extrapolating past their average as POCS methods do.

Code name → paper symbol: ``x`` → w^(t) (the global weights), ``deltas[i]`` → Δ_i^(t) (client
i's update, here w_i − w^(t); the paper's sign convention does not change the norms),
``len(deltas)`` → M (clients this round), ``eps`` → ε.

    Δ̄   = (1/M) Σ_i Δ_i
    η_g = max(1, Σ_i ‖Δ_i‖² / (2M (‖Δ̄‖² + ε)))
    w^(t+1) = w^(t) + η_g Δ̄

Norms run over all the parameters aggregated together. With near-orthogonal client updates
(e.g. clients holding disjoint classes) Σ‖Δ_i‖² ≈ M²‖Δ̄‖², so η_g ≈ M/2; with identical
updates η_g = 1 (FedAvg). The average is uniform, as in the paper. The paper evaluates the
average of the last two iterates; fedsynth's server EMA plays that part.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

from fedsynth.core.records import numpy_record
from fedsynth.strategies.state import Stateful

Arrays = dict[str, np.ndarray]


def fedexp_step(x: Arrays, deltas: list[Arrays], eps: float) -> tuple[Arrays, float]:
    """(w^(t+1), η_g) from the global weights and the clients' updates."""
    m = len(deltas)
    mean = {k: sum(d[k].astype(np.float64) for d in deltas) / m for k in x}
    sq_sum = sum(float(sum((d[k].astype(np.float64) ** 2).sum() for k in x)) for d in deltas)
    mean_sq = float(sum((v**2).sum() for v in mean.values()))
    eta = max(1.0, sq_sum / (2 * m * (mean_sq + eps)))
    return {k: (x[k] + eta * mean[k]).astype(x[k].dtype) for k in x}, eta


class FedExP(Stateful, fl.FedAvg):
    """FedAvg's client handling with FedExP's server step; ``last_eta`` is the latest η_g."""

    def __init__(self, *, eps: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.current: Arrays | None = None
        self.last_eta = 1.0

    def begin_round(self, arrays: ArrayRecord) -> None:
        self.current = {k: a.numpy() for k, a in arrays.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        assert self.current is not None, "begin_round must run first"
        deltas = [{k: a.numpy() - self.current[k] for k, a in r.content["arrays"].items()} for r in replies]
        new_x, self.last_eta = fedexp_step(self.current, deltas, self.eps)
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return numpy_record(new_x), metrics

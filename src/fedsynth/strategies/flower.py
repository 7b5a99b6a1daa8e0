"""Flower's own strategy classes (flwr.serverapp.strategy), made stateful.

The aggregation maths is Flower's; each class here only names its state and
receives the current global weights. Papers: FedAvg (McMahan et al. 2017),
FedMedian (Yin et al. 2018, coordinate-wise median), FedAvgM (Hsu et al. 2019),
FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021), FedProx (Li et al. 2020; the
proximal term is applied by the client), FedTrimmedAvg (Yin et al. 2018),
Krum / MultiKrum (Blanchard et al. 2017; the lowest-score updates are kept),
Bulyan (El Mhamdi et al. 2018).

This is the one module that touches Flower's internals: the attributes in which Flower's
classes keep their optimizer state (``momentum_vector``, ``m_t``, ``v_t``, ``current_arrays``),
named per class in ``state_attrs`` for :class:`~fedsynth.strategies.state.Stateful`, and the run
identity Flower's ``Message`` needs outside a Flower run (:func:`ensure_run_identity`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp import strategy as fl

from fedsynth.strategies.state import Stateful


class FedAvg(Stateful, fl.FedAvg):
    pass


class FedMedian(Stateful, fl.FedMedian):
    pass


class FedProx(Stateful, fl.FedProx):
    pass


class FedTrimmedAvg(Stateful, fl.FedTrimmedAvg):
    pass


class Krum(Stateful, fl.Krum):
    pass


class MultiKrum(Stateful, fl.MultiKrum):
    pass


class Bulyan(Stateful, fl.Bulyan):
    pass


class FedAvgM(Stateful, fl.FedAvgM):
    """v ← β v + Δ;  w ← w − η v  with Δ = w − mean(w_i) (the pseudo-gradient)."""

    state_attrs = ("momentum_vector",)

    def begin_round(self, arrays: ArrayRecord) -> None:
        self.current_arrays = arrays


class _FedOptState(Stateful):
    state_attrs = ("m_t", "v_t")

    def begin_round(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}


class FedAdam(_FedOptState, fl.FedAdam):
    pass


class FedYogi(_FedOptState, fl.FedYogi):
    pass


class FedAdagrad(_FedOptState, fl.FedAdagrad):
    pass


def ensure_run_identity() -> None:
    """Give Flower's ``Message`` a fixed run identity when none is set (outside a Flower run)."""
    from flwr.supercore.task_identity import TaskIdentity  # Flower internal: used here only

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0

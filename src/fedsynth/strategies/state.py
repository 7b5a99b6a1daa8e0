"""Explicit, saveable server-strategy state on top of Flower's strategy classes.

A strategy keeps its optimizer state in attributes; a subclass names them in
``state_attrs`` (Flower's own classes: :mod:`fedsynth.strategies.flower`, the one module that
knows Flower's attribute names). :class:`Stateful` exports them as plain tensors
(``state_dict``) and restores them loudly (``load_state_dict``), so a resumed run continues
with the same momenta and moments. ``begin_round`` hands the strategy
the current global weights (what Flower's ``configure_train`` would do), because the
fedsynth server builds its own per-node messages.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord


def _to_tensors(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}
    if isinstance(value, list):
        return [torch.from_numpy(np.array(v, copy=True)) for v in value]
    raise TypeError(f"cannot save strategy state of type {type(value).__name__}")


def _to_numpy(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


class Stateful:
    """Mixin: ``state_attrs`` lists the attributes that make up the strategy's state."""

    state_attrs: ClassVar[tuple[str, ...]] = ()

    def begin_round(self, arrays: ArrayRecord) -> None:
        """Called with the global weights before each round's aggregation."""

    def broadcast(self) -> dict[str, ArrayRecord]:
        """Extra records sent to every selected client with the global weights (none by default)."""
        return {}

    def round_metrics(self) -> dict[str, Any]:
        """Keys added to the round's metrics line (none by default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {name: _to_tensors(getattr(self, name)) for name in self.state_attrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.state_attrs):
            raise ValueError(
                f"{type(self).__name__} state keys {sorted(state)} != expected {sorted(self.state_attrs)}"
            )
        for name in self.state_attrs:
            setattr(self, name, _to_numpy(state[name]))

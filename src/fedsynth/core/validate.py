"""Screening client replies before aggregation (pure; no network).

A reply is dropped, with a reason, when the client raised, sent no weights, sent a
different key set, a wrong shape or dtype, a non-finite value, or a non-positive
example count. Missing replies (timeouts) are reported by the round loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Expected:
    shapes: dict[str, tuple[int, ...]]


def check_arrays(arrays: dict[str, np.ndarray], expected: Expected) -> str | None:
    """Reason the weights are unusable, or None when they are fine."""
    missing = sorted(set(expected.shapes) - set(arrays))
    if missing:
        return f"missing keys: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
    extra = sorted(set(arrays) - set(expected.shapes))
    if extra:
        return f"unexpected keys: {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}"
    for key, shape in expected.shapes.items():
        value = arrays[key]
        if tuple(value.shape) != shape:
            return f"wrong shape for {key}: {tuple(value.shape)} != {shape}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"non-float dtype for {key}: {value.dtype}"
        if not np.isfinite(value).all():
            return f"non-finite values (NaN/Inf) in {key}"
    return None


def check_metrics(metrics: dict[str, float], weight_key: str) -> str | None:
    value = metrics.get(weight_key)
    if value is None or not np.isfinite(value) or value <= 0:
        return f"invalid {weight_key}: {value!r}"
    loss = metrics.get("train-loss")
    if loss is not None and not np.isfinite(loss):
        return f"non-finite train-loss: {loss!r}"
    return None

"""The one adapter between fedsynth's typed client updates and Flower's strategies.

Flower's strategies aggregate ``Message`` replies (arrays + metrics [+ SCAFFOLD's control
record]); fedsynth holds :class:`Update` values. :func:`aggregate` builds those messages,
restricted to the keys being aggregated, in client-id order (so the result does not
depend on the order replies arrived in), and calls ``aggregate_train``. Both the
federated server and the ledger's aggregator nodes aggregate through it.

Outside a Flower run (an aggregator node, a unit test) Flower refuses to build a
``Message`` without a run identity; :func:`~fedsynth.strategies.flower.ensure_run_identity`
gives it a fixed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedsynth.core.errors import FedsynthError
from fedsynth.core.protocol import ARRAYS, METRICS, UpdateInfo
from fedsynth.strategies.flower import ensure_run_identity
from fedsynth.strategies.scaffold import CONTROL_KEY

Weights = dict[str, torch.Tensor]


class AggregationError(FedsynthError):
    """A strategy produced no aggregate."""


@dataclass(frozen=True)
class Update:
    """A screened client update: its report, decoded weights and SCAFFOLD's Δc_i if any."""

    info: UpdateInfo
    weights: Weights
    control: Weights | None = None


def as_message(update: Update, keys: list[str], node: int) -> Message:
    """``update`` restricted to ``keys``, in the form Flower's strategies aggregate."""
    ensure_run_identity()
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: update.weights[k].contiguous() for k in keys}),
            METRICS: update.info.to_record(),
        }
    )
    if update.control is not None:
        content[CONTROL_KEY] = ArrayRecord({k: update.control[k].contiguous() for k in keys})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def aggregate(strategy: Any, round_: int, updates: list[Update], keys: list[str]) -> Weights:
    """``strategy``'s aggregate of ``updates`` over ``keys`` (``begin_round`` already called)."""
    ordered = sorted(updates, key=lambda u: u.info.client)
    messages = [as_message(u, keys, node=i + 1) for i, u in enumerate(ordered)]
    aggregated, _ = strategy.aggregate_train(round_, messages)
    if aggregated is None:
        raise AggregationError(f"round {round_}: {type(strategy).__name__} produced no aggregate")
    return aggregated.to_torch_state_dict()

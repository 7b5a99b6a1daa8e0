"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II control-variate update).

Code name → paper symbol: ``x`` → x (global model), ``y`` → y_i (client model after K
local steps), ``c`` → c (server control variate), ``c_i`` → c_i (client's),
``lr`` → η_l, ``steps`` → K, ``server_lr`` → η_g, ``num_clients`` → N.

Client (each local step):  y ← y − η_l (g_i(y) − c_i + c)
Client (after K steps):    c_i⁺ = c_i − c + (x − y) / (K η_l);  send Δy = y − x, Δc = c_i⁺ − c_i
Server:                    x ← x + η_g · mean(Δy);  c ← c + (|S| / N) · mean(Δc)

The variance-reduction argument assumes plain SGD on the client (``train.optimizer =
"sgd"``); with Adam the correction is applied to the gradients all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

from fedsynth.core.records import numpy_record
from fedsynth.strategies.state import Stateful

Arrays = dict[str, np.ndarray]
CONTROL_KEY = "control"


def warn_if_adaptive(optimizer: str) -> None:
    """SCAFFOLD's guarantee is for SGD clients: say so when the clients use Adam(W)."""
    if optimizer != "sgd":
        logging.getLogger("fedsynth.strategies").warning(
            "SCAFFOLD's control variates assume SGD clients (Karimireddy et al. 2020); with "
            "train.optimizer = %r the correction is added to gradients the optimizer then rescales "
            "per coordinate, so client drift is not corrected as the paper proves: set "
            "train.optimizer = 'sgd'",
            optimizer,
        )


def client_control_update(c_i: Arrays, c: Arrays, x: Arrays, y: Arrays, *, steps: int, lr: float) -> Arrays:
    """c_i⁺ = c_i − c + (x − y) / (K η_l)."""
    return {k: c_i[k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in c_i}


def server_update(
    x: Arrays, c: Arrays, delta_y: list[Arrays], delta_c: list[Arrays], *, server_lr: float, num_clients: int
) -> tuple[Arrays, Arrays]:
    """x ← x + η_g · mean(Δy);  c ← c + (|S| / N) · mean(Δc)."""
    s = len(delta_y)
    new_x = {k: x[k] + server_lr * sum(d[k] for d in delta_y) / s for k in x}
    new_c = {k: c[k] + (s / num_clients) * sum(d[k] for d in delta_c) / s for k in c}
    return new_x, new_c


def corrected_gradient(grad: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
    """g_i(y) − c_i + c."""
    return grad - c_i + c


class Scaffold(Stateful, fl.FedAvg):
    """Clients reply with their weights y_i (``arrays``) and Δc_i (``control``)."""

    state_attrs = ("control",)

    def __init__(self, *, num_clients: int, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.server_lr = server_lr
        self.control: Arrays | None = None
        self.current: Arrays | None = None

    def begin_round(self, arrays: ArrayRecord) -> None:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current.items()}

    def broadcast(self) -> dict[str, ArrayRecord]:
        """Extra records sent to every selected client: the server control variate."""
        assert self.control is not None, "begin_round must run first"
        return {CONTROL_KEY: numpy_record(self.control)}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        assert self.current is not None and self.control is not None
        delta_y = [{k: a.numpy() - self.current[k] for k, a in r.content["arrays"].items()} for r in replies]
        delta_c = [{k: a.numpy() for k, a in r.content[CONTROL_KEY].items()} for r in replies]
        new_x, self.control = server_update(
            self.current,
            self.control,
            delta_y,
            delta_c,
            server_lr=self.server_lr,
            num_clients=self.num_clients,
        )
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return numpy_record(new_x), metrics

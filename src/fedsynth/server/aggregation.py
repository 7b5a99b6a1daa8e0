"""Steps around the strategies' aggregation, composed by the federated driver like its round
hooks: a step may replace the replies the strategies see (``before``: DP-FedAvg's clipped,
noised mean) or edit their aggregate (``after``: class-aware rows of the class embedding).
The driver itself knows neither; :func:`aggregation_steps` picks them from the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from fedsynth.config import Config
from fedsynth.core.protocol import UpdateInfo
from fedsynth.core.seeding import torch_generator
from fedsynth.privacy.client_level import noised_mean
from fedsynth.strategies.adapter import Update
from fedsynth.strategies.class_rows import CLASS_KEY, class_rows

Weights = dict[str, torch.Tensor]


class AggregationStep(Protocol):
    def before(self, round_: int, valid: list[Update], global_w: Weights) -> list[Update]:
        """The replies the strategies aggregate (``valid``, or what replaces them)."""
        ...

    def after(self, new: Weights, global_w: Weights, valid: list[Update]) -> Weights:
        """The aggregate (``new``, or an edited copy); ``valid``: the clients' own replies."""
        ...


class NoisedMean:
    """DP-FedAvg (privacy/client_level.py): the clipped, noised mean of the clients' updates
    is the strategies' only reply, so a mean-based server optimizer steps on private data only."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def before(self, round_: int, valid: list[Update], global_w: Weights) -> list[Update]:
        p = self.cfg.privacy
        weights = noised_mean(
            [u.weights for u in valid],
            {k: global_w[k] for k in valid[0].weights},
            clip=p.max_grad_norm,
            noise_multiplier=p.noise_multiplier,
            generator=torch_generator(self.cfg.seed, "dp-fedavg", round_),
        )
        info = UpdateInfo(client=-1, num_examples=1, num_steps=1, train_loss=0.0, compute_s=0.0)
        return [Update(info=info, weights=weights)]

    def after(self, new: Weights, global_w: Weights, valid: list[Update]) -> Weights:
        return new


class ClassAwareRows:
    """``strategy.class_aware``: each row of the class embedding averaged over the clients that
    hold that class (strategies/class_rows.py), weighted by the class counts the nodes reported."""

    def __init__(self, histograms: Callable[[], dict[int, list[int]]]) -> None:
        self.histograms = histograms  # known after node discovery

    def before(self, round_: int, valid: list[Update], global_w: Weights) -> list[Update]:
        return valid

    def after(self, new: Weights, global_w: Weights, valid: list[Update]) -> Weights:
        if CLASS_KEY not in new:
            return new
        rows = {u.info.client: u.weights[CLASS_KEY] for u in valid if CLASS_KEY in u.weights}
        counts = {k: self.histograms()[k] for k in rows}
        return {**new, CLASS_KEY: class_rows(new[CLASS_KEY], global_w[CLASS_KEY], rows, counts)}


def aggregation_steps(cfg: Config, histograms: Callable[[], dict[int, list[int]]]) -> list[AggregationStep]:
    """The steps ``cfg`` enables, in order (config rules keep the two apart)."""
    steps: list[AggregationStep] = []
    if cfg.privacy.mode == "dp-fedavg":
        steps.append(NoisedMean(cfg))
    if cfg.strategy.class_aware:
        steps.append(ClassAwareRows(histograms))
    return steps

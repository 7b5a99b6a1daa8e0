"""FedDiff's pre-training on the proxy set (Li & Ping §2.2), run by the server before round 1.

The proxy set is Phoenix's shared set G (``phoenix.beta`` % of the clients' images, class
balanced, held by the server; docs/privacy.md). From the initial global model the server
trains ``feddiff.pool_runs`` copies of the task's model on it (the clients' optimizer, each
run its own data order), keeping the subset every ``feddiff.pool_every`` steps with its
proxy-set score — accuracy for a classifier, minus the denoising loss (fixed noise and
timesteps) for a diffusion model. The pool then trains the weight autoencoder and the
latent DDPM (``strategies/feddiff.py``). The pool and both networks never leave the server.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from fedsynth.config import Config
from fedsynth.core.rundir import RunDir
from fedsynth.core.seeding import torch_generator
from fedsynth.data.datasets import ImageData
from fedsynth.diffusion.training import make_optimizer
from fedsynth.server.calibration import aux_loss
from fedsynth.strategies.feddiff import FedDiff, Scorer, flatten, pretrain_space, subset_keys
from fedsynth.training.round_loop import Model
from fedsynth.training.tasks import heldout_accuracy, task_steps

log = logging.getLogger("fedsynth.server")


def proxy_scorer(cfg: Config, model: Model, proxy: ImageData) -> Scorer:
    """Weights → their proxy-set score (higher is better), on a private copy of the model."""
    net = copy.deepcopy(model.net)

    def score(weights: dict[str, torch.Tensor]) -> float:
        net.load_state_dict({k: v.to(model.device) for k, v in weights.items()}, strict=True)
        if cfg.task == "classifier":
            return heldout_accuracy(net, proxy)
        return -aux_loss(net, model.scheduler, proxy, cfg.seed)

    return score


def collect_pool(
    cfg: Config, model: Model, proxy: ImageData, keys: list[str], score: Scorer
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W × D subset vectors, W scores) along ``pool_runs`` training runs on the proxy set."""
    fd, vectors, scores = cfg.feddiff, [], []
    for run in range(fd.pool_runs):
        net = copy.deepcopy(model.net)
        optimizer = make_optimizer(net, cfg.train)
        generator = torch_generator(cfg.seed, "feddiff-pool", run, device=model.device)
        for _ in range(fd.pool_steps // fd.pool_every):
            task_steps(cfg, net, optimizer, model.scheduler, proxy, steps=fd.pool_every, generator=generator)
            weights = {k: v.detach() for k, v in net.state_dict().items()}
            vectors.append(flatten(weights, keys))
            scores.append(score(weights))
    return torch.stack(vectors), torch.tensor(scores)


def attach_weight_space(cfg: Config, run: RunDir, model: Model, proxy: ImageData, strategy: FedDiff) -> None:
    """Give ``strategy`` its proxy-set scorer, pre-training its weight space unless a resumed
    checkpoint already holds it; the cost and the pool are recorded in ``summary.feddiff``."""
    score = proxy_scorer(cfg, model, proxy)
    if strategy.space is not None:
        strategy.attach(None, score)
        return
    start = time.perf_counter()
    keys = subset_keys(model.net, cfg.feddiff.subset)
    log.info("FedDiff: collecting the weight pool on %d proxy images (%s)", len(proxy), ", ".join(keys))
    vectors, scores = collect_pool(cfg, model, proxy, keys, score)
    pool_s = time.perf_counter() - start
    space, losses = pretrain_space(keys, vectors, scores, cfg.feddiff, cfg.seed)
    strategy.attach(space, score)
    run.update_summary(
        feddiff={
            "subset": keys,
            "subset_params": int(vectors.shape[1]),
            "pool_size": int(vectors.shape[0]),
            "pool_score_range": [float(scores.min()), float(scores.max())],
            "proxy_images": len(proxy),
            "pool_s": round(pool_s, 2),
            "pretrain_s": round(time.perf_counter() - start, 2),
            **{k: round(v, 5) for k, v in losses.items()},
        }
    )

"""Partitioners: split training labels among simulated data holders.

Each partitioner maps ``labels`` (the training split's labels) to a list of index
arrays, one per client, indexing into ``labels``. All are seeded and deterministic.

- ``iid``: a seeded shuffle cut into equal parts.
- ``dirichlet``: label skew, per-class shares ~ Dir(α) (flwr-datasets'
  ``DirichletPartitioner``; retried until every client holds ``min_samples``).
- ``pathological``: each client holds ``classes_per_client`` classes
  (flwr-datasets' ``PathologicalPartitioner``, "first-deterministic" assignment so that
  every class is held when there are at least as many clients as classes).
- ``class_disjoint``: no two clients share a class; with more clients than classes
  the most frequent classes are split between clients (Senden 2025).
- ``quantity``: IID labels, client sizes ~ Dir(α) with ``min_samples`` each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from fedsynth.config import PartitionConfig
from fedsynth.core.errors import ConfigError, first_line

Partitioner = Callable[[np.ndarray, PartitionConfig, int], list[np.ndarray]]


def partition_iid(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, cfg.num_clients)]


def _flwr_partitions(labels: np.ndarray, partitioner) -> list[np.ndarray]:
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    n = partitioner.num_partitions
    return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)) for i in range(n)]


def partition_dirichlet(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(
        num_partitions=cfg.num_clients,
        partition_by="label",
        alpha=cfg.alpha,
        min_partition_size=cfg.min_samples,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    try:
        with warnings.catch_warnings():  # its retry warnings; we raise one clear error
            warnings.simplefilter("ignore", UserWarning)
            return _flwr_partitions(labels, part)
    except ValueError as exc:
        raise ConfigError(
            f"dirichlet partition impossible with partition.alpha={cfg.alpha}, "
            f"partition.min_samples={cfg.min_samples}, {cfg.num_clients} clients and "
            f"{len(labels)} samples: {first_line(exc)}"
        ) from None


def partition_pathological(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    num_classes = len(np.unique(labels))
    if cfg.classes_per_client > num_classes:
        raise ConfigError(
            f"partition.classes_per_client ({cfg.classes_per_client}) exceeds the "
            f"{num_classes} classes in the data"
        )
    part = PathologicalPartitioner(
        num_partitions=cfg.num_clients,
        partition_by="label",
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    return _flwr_partitions(labels, part)


def assign_disjoint_classes(counts: np.ndarray, num_clients: int) -> list[list[int]]:
    """Which classes each client holds (pure). Classes present in the data are given
    out so no two clients share one; extra clients split the most frequent classes.

    Returns, per client, a list of class ids. With more clients than classes a class
    may appear for several clients (its samples are then split between them).
    """
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    if num_clients <= len(present):
        # largest-first greedy: each class to the currently smallest client
        loads = np.zeros(num_clients)
        owners: list[list[int]] = [[] for _ in range(num_clients)]
        for c in present:
            k = int(np.argmin(loads))
            owners[k].append(c)
            loads[k] += counts[c]
        return [sorted(o) for o in owners]
    holders = {c: 1 for c in present}
    for _ in range(num_clients - len(present)):
        c = max(present, key=lambda c: (counts[c] / holders[c], -c))
        holders[c] += 1
    return [[c] for c in present for _ in range(holders[c])]


def partition_class_disjoint(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    owners = assign_disjoint_classes(counts, cfg.num_clients)
    parts: list[list[np.ndarray]] = [[] for _ in owners]
    for c in range(len(counts)):
        holders = [k for k, classes in enumerate(owners) if c in classes]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, piece in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def quantity_sizes(n: int, cfg: PartitionConfig, rng: np.random.Generator) -> np.ndarray:
    """Client sizes: ``min_samples`` each plus a Dir(α) share of the rest (pure)."""
    spare = n - cfg.num_clients * cfg.min_samples
    if spare < 0:
        raise ConfigError(
            f"quantity partition needs {cfg.num_clients} x partition.min_samples="
            f"{cfg.min_samples} samples but the training split has {n}"
        )
    shares = rng.dirichlet(np.full(cfg.num_clients, cfg.alpha))
    extra = np.floor(shares * spare).astype(np.int64)
    extra[np.argsort(-shares)[: spare - extra.sum()]] += 1
    return cfg.min_samples + extra


def partition_quantity(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = quantity_sizes(len(labels), cfg, rng)
    order = rng.permutation(len(labels))
    return [np.sort(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


PARTITIONERS: dict[str, Partitioner] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "pathological": partition_pathological,
    "class_disjoint": partition_class_disjoint,
    "quantity": partition_quantity,
}


def partition(labels: np.ndarray, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Split ``labels`` among ``cfg.num_clients`` clients with ``cfg.scheme``."""
    if cfg.scheme not in PARTITIONERS:
        raise ConfigError(
            f"partition.scheme = {cfg.scheme!r} is not valid; choose one of: {', '.join(PARTITIONERS)}"
        )
    if cfg.num_clients > len(labels):
        raise ConfigError(f"{cfg.num_clients} clients but only {len(labels)} training samples")
    parts = PARTITIONERS[cfg.scheme](np.asarray(labels, dtype=np.int64), cfg, seed)
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partition.scheme = {cfg.scheme!r} left client(s) {empty} with no data")
    return parts


def histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) sample counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])

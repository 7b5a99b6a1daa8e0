"""Stage 1: load the dataset, carve the held-out test split, partition the training
split among clients, and write ``partitions.json`` (+ a clients × classes heat-map)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from fedsynth.config import Config
from fedsynth.core.errors import RunDirError
from fedsynth.core.rundir import RunDir, read_json, write_json_atomic
from fedsynth.data.datasets import ImageData, SplitDataset, load_dataset
from fedsynth.data.partition import histograms, partition
from fedsynth.data.sharing import share
from fedsynth.report.plots import plot_partition_heatmap


@dataclass(frozen=True)
class Prepared:
    data: SplitDataset
    clients: list[np.ndarray]  # per client: indices into ``data.full`` (its own data)
    shared: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # Phoenix's G
    merged: list[np.ndarray] | None = None  # per client: the part of G it received

    def client_indices(self, k: int) -> np.ndarray:
        return self.clients[k] if self.merged is None else np.concatenate([self.clients[k], self.merged[k]])

    def client_data(self, k: int) -> ImageData:
        return self.data.full.subset(self.client_indices(k))

    def shared_data(self) -> ImageData | None:
        return self.data.full.subset(self.shared) if len(self.shared) else None

    @property
    def histograms(self) -> np.ndarray:
        labels = self.data.full.labels.numpy()
        parts = [self.client_indices(k) for k in range(len(self.clients))]
        return histograms(labels, parts, self.data.full.num_classes)


def prepare(cfg: Config, run: RunDir | None = None) -> Prepared:
    data = load_dataset(cfg.data)
    train_labels = data.full.labels.numpy()[data.train_indices]
    parts = partition(train_labels, cfg.partition, cfg.seed)
    clients = [data.train_indices[p] for p in parts]
    if cfg.phoenix.beta > 0:
        sh = share(clients, data.full.labels.numpy(), cfg.phoenix.beta, cfg.phoenix.alpha, cfg.seed)
        prepared = Prepared(data, sh.clients, sh.shared, sh.merged)
    else:
        prepared = Prepared(data, clients)
    if run is not None:
        write_partitions(run, cfg, prepared)
    return prepared


def write_partitions(run: RunDir, cfg: Config, prepared: Prepared) -> None:
    hist = prepared.histograms
    names = list(prepared.data.full.class_names)
    write_json_atomic(
        run.partitions,
        {
            "dataset": cfg.data.dataset,
            "scheme": cfg.partition.scheme,
            "seed": cfg.seed,
            "class_names": names,
            "clients": [
                {
                    "id": k,
                    "size": len(prepared.client_indices(k)),
                    "histogram": hist[k].tolist(),
                    "indices": idx.tolist(),
                    "shared_received": [] if prepared.merged is None else prepared.merged[k].tolist(),
                }
                for k, idx in enumerate(prepared.clients)
            ],
            "shared_indices": prepared.shared.tolist(),
            "train_indices": prepared.data.train_indices.tolist(),
            "test_indices": prepared.data.test_indices.tolist(),
            "train_sha256": training_fingerprint(prepared),
        },
    )
    plot_partition_heatmap(hist, names, run.root / "partitions.png")


def training_fingerprint(prepared: Prepared) -> str:
    """SHA-256 of the training split's images (as loaded) and labels, in index order."""
    data, idx = prepared.data.full, prepared.data.train_indices
    h = hashlib.sha256(np.ascontiguousarray(data.images[idx].numpy()).tobytes())
    h.update(np.ascontiguousarray(data.labels[idx].numpy()).tobytes())
    return h.hexdigest()


def check_partitions(run: RunDir, prepared: Prepared) -> None:
    """Loud error if the run directory's recorded split differs from the data now (its indices,
    and, for runs that recorded it, the training images themselves)."""
    recorded = read_json(run.partitions)
    recorded_sha = recorded.get("train_sha256")
    if recorded_sha is not None and recorded_sha != training_fingerprint(prepared):
        raise RunDirError(
            f"{run.partitions}: the training images are not the ones this run trained on (SHA-256 "
            f"{recorded_sha[:12]}… recorded); point data.path back at them, or start a new run"
        )
    if recorded["test_indices"] != prepared.data.test_indices.tolist():
        raise RunDirError(f"{run.partitions}: the test split no longer matches the dataset")
    if [c["indices"] for c in recorded["clients"]] != [p.tolist() for p in prepared.clients] or recorded.get(
        "shared_indices", []
    ) != prepared.shared.tolist():
        raise RunDirError(f"{run.partitions}: client partitions no longer match the config")

"""The domain classifier: trained once per dataset (real training split) and cached, so
every run on that dataset is judged by the same model. The cache key is a hash of the
training images, labels, class names and training settings."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch

from fedsynth.core.errors import first_line
from fedsynth.data.datasets import ImageData
from fedsynth.evaluation.classifier import SmallCNN, train_classifier

log = logging.getLogger("fedsynth.evaluation")

DOMAIN_SEED = 0  # fixed: not the run's seed, so all runs share one judge
VERSION = "smallcnn-v1"


def cache_root(configured: str) -> Path:
    return Path(configured or os.environ.get("FEDSYNTH_CACHE") or Path.home() / ".cache" / "fedsynth")


def dataset_key(train: ImageData, epochs: int) -> str:
    h = hashlib.sha256()
    h.update(train.images.contiguous().numpy().tobytes())
    h.update(train.labels.numpy().tobytes())
    h.update("|".join(train.class_names).encode())
    h.update(f"{VERSION}|{epochs}".encode())
    return h.hexdigest()[:20]


def domain_classifier(
    train: ImageData, *, epochs: int, device: torch.device, cache_dir: str = ""
) -> SmallCNN:
    path = cache_root(cache_dir) / f"domain-{dataset_key(train, epochs)}.pt"
    model = SmallCNN(train.shape[0], train.num_classes)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.to(device).eval()
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            log.warning(
                "cached domain classifier %s is damaged (%s): training it again", path, first_line(err)
            )
    model = train_classifier(train, epochs=epochs, seed=DOMAIN_SEED, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model

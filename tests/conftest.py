import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FEDSYNTH_CACHE", tempfile.mkdtemp(prefix="fedsynth-test-cache-"))

# A tiny end-to-end configuration: tiny UNet, few steps, few samples.
TINY_OVERRIDES = [
    "model.preset=tiny",
    "federation.rounds=2",
    "federation.clients_per_round=2",
    "federation.checkpoint_every=1",
    "partition.num_clients=2",
    "train.local_steps=3",
    "train.batch_size=16",
    "diffusion.num_train_timesteps=50",
    "sample.per_class=3",
    "sample.steps=2",
    "eval.classifier_epochs=1",
    "eval.cas_epochs=1",
]


@pytest.fixture
def rng():
    return np.random.default_rng(0)

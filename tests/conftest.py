import os
import tempfile

import numpy as np
import pytest

from fedsynth.config.presets import TINY

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FEDSYNTH_CACHE", tempfile.mkdtemp(prefix="fedsynth-test-cache-"))

# A tiny end-to-end configuration: tiny UNet, few steps, few samples.
TINY_OVERRIDES = list(TINY)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

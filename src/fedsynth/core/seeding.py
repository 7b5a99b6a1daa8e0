"""The one derivation of random streams from the run's ``seed``.

Every place that needs its own stream (a client's local round, client selection, the
USPLIT assignment, the shared set, server-side training, auxiliary generation, the
self-check) asks :func:`derive` with a purpose and the integers that identify the stream
(round, client, attempt, …). Streams come from NumPy's ``SeedSequence``, which mixes its
entropy so that nearby inputs give unrelated streams, and the same inputs give the same
stream on every machine and in every process.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive(seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit seed for the stream (``seed``, ``purpose``, ``*ids``)."""
    if any(int(i) < 0 for i in (seed, *ids)):
        raise ValueError(f"seeds and stream ids must be non-negative, got {(seed, *ids)}")
    entropy = [int(seed), zlib.crc32(purpose.encode()), *(int(i) for i in ids)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(derive(seed, purpose, *ids))


def torch_generator(
    seed: int, purpose: str, *ids: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive(seed, purpose, *ids))

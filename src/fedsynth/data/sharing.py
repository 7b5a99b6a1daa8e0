"""Phoenix data sharing (Jothiraj & Mashhadi, §3.2.1), on index arrays.

G, the globally shared set, has β % of the clients' data size, |G| = β/100 · Σ|C_k|,
taken class-balanced (as equal a count per class as the data allows) from the clients'
data at random and removed from the clients. Every client then receives its own random
α % of G (seeded by client id) merged into its data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsynth.core.seeding import numpy_rng


@dataclass(frozen=True)
class Shared:
    shared: np.ndarray  # G: indices into the full dataset
    clients: list[np.ndarray]  # each client's own data, without G
    merged: list[np.ndarray]  # the part of G each client receives


def _balanced_take(pools: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, how many to take so the total is ``size`` and classes are as equal as possible."""
    want = np.zeros(len(pools), dtype=int)
    avail = np.array([len(p) for p in pools])
    for _ in range(size):  # water-filling: one at a time to the class with the fewest so far
        open_ = np.flatnonzero(want < avail)
        want[open_[np.argmin(want[open_])]] += 1
    return [rng.choice(p, size=n, replace=False) for p, n in zip(pools, want, strict=True)]


def share(clients: list[np.ndarray], labels: np.ndarray, beta: float, alpha: float, seed: int) -> Shared:
    """``labels`` are the full dataset's labels (indexed by the client indices)."""
    rng = numpy_rng(seed, "shared-set")
    own = np.concatenate(clients)
    size = round(beta / 100 * len(own))
    if size == 0:
        return Shared(np.zeros(0, dtype=int), list(clients), [np.zeros(0, dtype=int) for _ in clients])
    pools = [own[labels[own] == c] for c in np.unique(labels[own])]
    shared = np.sort(np.concatenate(_balanced_take(pools, size, rng)))
    taken = set(shared.tolist())
    rest = [np.array([i for i in c if i not in taken], dtype=int) for c in clients]
    per_client = round(alpha / 100 * size)
    merged = [
        np.sort(numpy_rng(seed, "shared-set", k).choice(shared, size=per_client, replace=False))
        for k in range(len(clients))
    ]
    return Shared(shared, rest, merged)

"""Exchange plans: which groups each client downloads and uploads in a round.

full:    everything both ways.
usplit:  download everything; selected clients are paired (seeded shuffle); in each pair a
         seeded coin makes one client upload *up* and the other *down*, and a second coin
         gives *mid* to one of them. With an odd number of clients the unpaired one uploads
         everything. The server averages each group over the clients that sent it.
udec:    only *up* is exchanged; down and mid stay with each client (personal models).
ulatdec: *mid* and *up* are exchanged; down stays with each client.
"""

from __future__ import annotations

import numpy as np

from fedsynth.core.seeding import numpy_rng
from fedsynth.exchange.groups import GROUPS

Groups = tuple[str, ...]
DOWNLOAD: dict[str, Groups] = {"full": GROUPS, "usplit": GROUPS, "udec": ("up",), "ulatdec": ("mid", "up")}
# Groups always sent together are aggregated together (one strategy instance per unit).
UNITS: dict[str, tuple[Groups, ...]] = {
    "full": (GROUPS,),
    "usplit": (("down",), ("mid",), ("up",)),
    "udec": (("up",),),
    "ulatdec": (("mid", "up"),),
}


def is_personal(plan: str) -> bool:
    """True when some groups never leave the clients (each client ends with its own model)."""
    return DOWNLOAD[plan] != GROUPS


def usplit_assignment(selected: list[int], rng: np.random.Generator) -> dict[int, Groups]:
    order = [int(c) for c in rng.permutation(selected)]
    out: dict[int, Groups] = {}
    for a, b in zip(order[0::2], order[1::2], strict=False):
        up_client, down_client = (a, b) if rng.random() < 0.5 else (b, a)
        mid_with_up = bool(rng.random() < 0.5)
        out[up_client] = ("mid", "up") if mid_with_up else ("up",)
        out[down_client] = ("down",) if mid_with_up else ("down", "mid")
    if len(order) % 2:
        out[order[-1]] = GROUPS
    return out


def upload_groups(plan: str, selected: list[int], seed: int, round_: int, attempt: int) -> dict[int, Groups]:
    """Client id → groups it uploads this round (seeded by seed, round and attempt)."""
    if plan == "usplit":
        return usplit_assignment(selected, numpy_rng(seed, "usplit", round_, attempt))
    return {c: DOWNLOAD[plan] for c in selected}

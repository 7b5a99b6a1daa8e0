"""Phoenix threshold filtering, server side (pure): who is warned, who is excluded.

From round ``phoenix.filter_from`` every reply carries the client's self-measured
precision. Mode ``lowest`` warns the client with the lowest precision; mode
``threshold`` warns every client below ``phoenix.precision_threshold``. A client warned
in two consecutive reports (two strikes) is excluded from all later rounds — unless that
would leave fewer eligible clients than a round selects (``federation.clients_per_round``):
then the lowest-precision candidates go first and the others are spared; from then on the
floor is reached and nobody else is excluded (a degenerate threshold would otherwise shut the
federation down to one client).
"""

from __future__ import annotations


def warned(precision: dict[int, float], mode: str, threshold: float) -> set[int]:
    if not precision:
        return set()
    if mode == "lowest":
        return {min(precision, key=lambda pid: (precision[pid], pid))}
    return {pid for pid, p in precision.items() if p < threshold}


def strikes_after(strikes: dict[int, int], reported: set[int], warned_now: set[int]) -> dict[int, int]:
    """Consecutive warnings per client: +1 when warned, reset to 0 when it reported unwarned."""
    out = dict(strikes)
    for pid in reported:
        out[pid] = out.get(pid, 0) + 1 if pid in warned_now else 0
    return out


def exclusions(
    before: set[int], strikes: dict[int, int], precision: dict[int, float], num_clients: int, floor: int
) -> tuple[set[int], list[int]]:
    """(excluded from now on, spared this time). Candidates are clients with two strikes not yet
    excluded; at most ``num_clients - floor`` clients are ever excluded, lowest precision first."""
    candidates = sorted(
        (pid for pid, n in strikes.items() if n >= 2 and pid not in before),
        key=lambda pid: (precision.get(pid, 0.0), pid),
    )
    room = max(0, num_clients - len(before) - floor)
    return before | set(candidates[:room]), sorted(candidates[room:])

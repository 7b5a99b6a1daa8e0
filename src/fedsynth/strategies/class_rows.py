"""Class-aware aggregation of the class-embedding rows (after FedSubAvg, Ding et al.,
NeurIPS 2022, which corrects each embedding row by the clients that touch it).

Row c of ``class_embedding.weight`` is trained only by clients that hold class c. Averaged
over every selected client it moves by the holders' share of the weight alone (0.17–0.39 in
the demo), because the other clients send it back unchanged. Here, after the strategy has
aggregated, each class row is replaced by the average of the rows the selected holders sent,
weighted by their counts; a row no selected client holds keeps its value from before the
round; the last row — the "no label" token of classifier-free guidance, which every client
trains — keeps the strategy's aggregate:

    w[c] = Σ_k n_kc · w_k[c] / Σ_k n_kc     over selected clients k with n_kc > 0

(code: ``sent[k]`` = w_k, ``counts[k][c]`` = n_kc, ``previous`` = the global weights
before the round, ``aggregated`` = the strategy's result).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CLASS_KEY = "class_embedding.weight"


def class_rows(
    aggregated: torch.Tensor,
    previous: torch.Tensor,
    sent: dict[int, torch.Tensor],
    counts: dict[int, Sequence[int]],
) -> torch.Tensor:
    """The class-embedding table with each class row averaged over its selected holders."""
    num_classes = aggregated.shape[0] - 1  # the last row is the "no label" token
    for k, table in sent.items():
        if table.shape != aggregated.shape or len(counts[k]) != num_classes:
            shape, classes = tuple(table.shape), len(counts[k])
            raise ValueError(f"client {k}: table {shape} with {classes} class counts does not match")
    out = aggregated.clone()
    for c in range(num_classes):
        holders = [(k, float(counts[k][c])) for k in sent if counts[k][c] > 0]
        if not holders:
            out[c] = previous[c]
            continue
        total = sum(n for _, n in holders)
        out[c] = sum(n * sent[k][c].to(torch.float64) for k, n in holders).div(total).to(out.dtype)
    return out

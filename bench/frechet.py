"""Fréchet distance: fedsynth's eigenvalue form vs the matrix-square-root form (scipy's sqrtm,
as pytorch-fid computes it), on Inception-sized features, interleaved in one process.
Results: bench/results/frechet/frechet.json.

    .venv/bin/python bench/frechet.py [--dims 2048] [--samples 8,3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import linalg

from _common import write_result
from fedsynth.evaluation.metrics import feature_stats, frechet_distance


def sqrtm_form(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def case(n: int, dims: int, repeats: int) -> dict:
    rng = np.random.default_rng(n)
    real = rng.normal(size=(n, dims))
    fake = rng.normal(size=(n, dims)) @ (rng.normal(size=(dims, dims)) * 0.05) + 0.3
    stats = (*feature_stats(real), *feature_stats(fake))
    ours, ref = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        ours.append(timed(frechet_distance, *stats))
        ref.append(timed(sqrtm_form, *stats))
    t_ours = statistics.median(t for t, _ in ours)
    t_ref = statistics.median(t for t, _ in ref)
    return {
        "samples": n,
        "dims": dims,
        "eigenvalue_s": t_ours,
        "sqrtm_s": t_ref,
        "speedup": t_ref / t_ours,
        "fd_eigenvalue": ours[0][1],
        "fd_sqrtm": ref[0][1],
        "relative_difference": abs(ours[0][1] - ref[0][1]) / abs(ref[0][1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, default=2048)
    ap.add_argument("--samples", default="8,3000", help="set sizes (fewer than dims: singular covariances)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [case(int(n), args.dims, args.repeats) for n in args.samples.split(",")]
    write_result("frechet", {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()

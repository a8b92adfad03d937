"""Coordinate-wise trimmed mean (Yin et al., 2018), unweighted. NOT streaming.

With k accepted deltas and trim fraction beta (`--trim-fraction`, default 0.1), t = floor(beta*k)
values are dropped at each end of every coordinate and the rest averaged:

    w'[j] = w[j] + mean(sorted(d_1[j], ..., d_k[j])[t : k - t])

It tolerates up to t Byzantine devices per coordinate; with t = 0 (beta * k < 1, e.g. k < 10
at beta = 0.1) it is the plain unweighted mean and defends against nothing, which the round
record shows as trimmed = 0. beta must be in [0, 0.5): then k - 2t >= 1 for every k >= 1.

Unweighted and memory-hungry for the same reasons as the median (aggregator/median.py): it
holds and persists k * num_params float32 values; clipping, when asked for, wraps it
(aggregator/clipping.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlearn.aggregator.median import CoordinateWise
from fleetlearn.aggregator.options import Options, option


def check_trim_fraction(beta: float) -> float:
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    return float(beta)


def trim_count(k: int, beta: float) -> int:
    """t = floor(beta * k): how many values are dropped at EACH end of a coordinate."""
    check_trim_fraction(beta)
    # The small epsilon keeps e.g. 0.1 * 30 = 3.0000000000000004 -> 3, 0.3 * 10 = 2.9999999999999996 -> 3.
    return int(math.floor(beta * k + 1e-9))


def coordinate_trimmed_mean(deltas: np.ndarray, beta: float) -> np.ndarray:
    """mean over axis 0 of a (k, P) stack after dropping the t = floor(beta k) smallest and
    t largest values of each column; float64 (P,)."""
    stack = np.asarray(deltas, dtype=np.float64)
    if stack.ndim != 2 or stack.shape[0] < 1:
        raise ValueError(f"need a (k >= 1, P) stack of deltas, got shape {stack.shape}")
    k = stack.shape[0]
    t = trim_count(k, beta)
    kept = np.sort(stack, axis=0)[t : k - t]
    return kept.mean(axis=0)


@dataclass(frozen=True)
class TrimmedMeanOptions(Options):
    trim_fraction: float = option(
        0.1,
        "--trim-fraction",
        float,
        "trimmed-mean: drop floor(BETA*k) largest and smallest values per coordinate",
        metavar="BETA",
        check=lambda b: 0 <= b < 0.5,
        bound="in [0, 0.5)",
    )


class TrimmedMean(CoordinateWise):
    """Coordinate-wise beta-trimmed mean of the deltas, unweighted."""

    name = "trimmed-mean"
    Options = TrimmedMeanOptions

    def __init__(self, options: TrimmedMeanOptions | None = None):
        super().__init__(options)
        self.trim_fraction = float(self.options.trim_fraction)

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return coordinate_trimmed_mean(deltas, self.trim_fraction)

    def round_summary(self) -> dict[str, Any]:
        return {
            **super().round_summary(),
            "trim_fraction": self.trim_fraction,
            "trimmed": trim_count(len(self._samples), self.trim_fraction),
        }

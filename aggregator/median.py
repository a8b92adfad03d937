"""Coordinate-wise median (Yin et al., 2018), unweighted. NOT streaming.

Every accepted delta d_1..d_k (optionally clipped first, `--clip-norm`) is kept; at the close

    w'[j] = w[j] + median(d_1[j], ..., d_k[j])      for every coordinate j

(for even k, the mean of the two middle values, as numpy's median). With f < k/2 Byzantine
devices every coordinate of the result lies between two honest values, whatever the
attackers send: a scaled or sign-flipped update moves the median by at most one order
statistic per coordinate, never by its own magnitude.

Unweighted, on purpose: the sample counts n_i are self-reported (the protocol accepts up to
2^31 - 1), so a weighted median would hand the median to one device that claims a large
count. The price: with honest shards of very different sizes a small device counts as much as
a large one, and the median is a noisier estimator than the mean when nothing is attacked.

Memory: the accumulator holds k * num_params float32 values (the streaming strategies hold
one float64 vector), and state_dict() persists all of them after every accepted update so
the restart contract holds: bound k with --target-devices. See docs/security-robust-dp.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.protocol import Update

from fleetlearn.aggregator.clipping import clip_delta, l2_norm, norm_summary
from fleetlearn.aggregator.fedavg import FedAvg, weighted_mean


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    """median over axis 0 of a (k, P) stack, in float64: (P,)."""
    stack = np.asarray(deltas, dtype=np.float64)
    if stack.ndim != 2 or stack.shape[0] < 1:
        raise ValueError(f"need a (k >= 1, P) stack of deltas, got shape {stack.shape}")
    return np.median(stack, axis=0)


def apply_delta(weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """w' = w + d, in float64, rounded once to float32 (a new array)."""
    return (np.asarray(weights, dtype=np.float64) + delta).astype(np.float32)


class CoordinateWise(FedAvg):
    """Shared by the non-streaming strategies: keep every (optionally clipped) delta.

    Round configuration (local_epochs, lr schedule, ...) is FedAvg's; the accumulator is not.
    """

    streaming = False

    def __init__(self, clip_norm: float | None = None, **round_options: Any):
        super().__init__(**round_options)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self._deltas: list[np.ndarray] = []
        self._samples: list[int] = []
        self._losses: list[float] = []
        self._norms: list[float] = []
        self._clipped = 0

    # the combining rule: (k, P) float32 stack -> (P,) float64 delta
    def combine(self, deltas: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def begin_round(self, global_weights: np.ndarray) -> None:
        self._weights = np.asarray(global_weights, dtype=np.float32)
        self._deltas, self._samples, self._losses, self._norms = [], [], [], []
        self._clipped = 0

    def accumulate(self, update: Update) -> None:
        assert self._weights is not None, "begin_round first"
        delta = np.asarray(update.delta, dtype=np.float32)
        self._norms.append(l2_norm(delta))
        if self.clip_norm is not None:
            clipped, was_clipped = clip_delta(delta, self.clip_norm)
            delta = clipped.astype(np.float32)
            self._clipped += int(was_clipped)
        self._deltas.append(delta.copy())
        self._samples.append(int(update.samples))
        self._losses.append(float(update.train_loss))

    def aggregate(self) -> np.ndarray:
        assert self._weights is not None, "begin_round first"
        if not self._deltas:
            raise ValueError("no updates accumulated: a round needs at least one accepted update")
        return apply_delta(self._weights, self.combine(np.stack(self._deltas)))

    def state_dict(self) -> dict[str, Any]:
        assert self._weights is not None, "begin_round first"
        size = self._weights.size
        stack = np.stack(self._deltas) if self._deltas else np.zeros((0, size), np.float32)
        return {"deltas": stack, "samples": list(self._samples), "losses": list(self._losses), "norms": list(self._norms), "clipped": self._clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self._weights is not None, "begin_round first"
        stack = np.asarray(state["deltas"], dtype=np.float32)
        k = len(state["samples"])
        if stack.ndim != 2 or stack.shape != (k, self._weights.size) or len(state["losses"]) != k or len(state["norms"]) != k:
            raise ValueError(f"saved deltas have shape {stack.shape}, expected ({k}, {self._weights.size})")
        if any(not isinstance(n, int) or n < 1 for n in state["samples"]):
            raise ValueError("saved accumulator has a bad sample count")
        self._deltas = [row.copy() for row in stack]
        self._samples = list(state["samples"])
        self._losses = [float(v) for v in state["losses"]]
        self._norms = [float(v) for v in state["norms"]]
        self._clipped = int(state["clipped"])

    def round_summary(self) -> dict[str, Any]:
        total = sum(self._samples)
        loss_sum = sum(float(n) * v for n, v in zip(self._samples, self._losses))
        return {"samples": total, "train_loss": weighted_mean(loss_sum, total), **norm_summary(self.clip_norm, self._clipped, self._norms)}


class Median(CoordinateWise):
    """Coordinate-wise median of the (optionally clipped) deltas, unweighted."""

    name = "median"

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return coordinate_median(deltas)

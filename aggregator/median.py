"""Coordinate-wise median (Yin et al., 2018), unweighted. NOT streaming.

Every accepted delta d_1..d_k (clipped first when wrapped by `--clip-norm`) is kept; at the close

    w'[j] = w[j] + median(d_1[j], ..., d_k[j])      for every coordinate j

(for even k, the mean of the two middle values, as numpy's median). With f < k/2 Byzantine
devices every coordinate of the result lies between two honest values, whatever the
attackers send: a scaled or sign-flipped update moves the median by at most one order
statistic per coordinate, never by its own magnitude.

Unweighted, on purpose: the sample counts n_i are self-reported (the protocol accepts up to
2^31 - 1), so a weighted median would hand the median to one device that claims a large
count. The price: with honest shards of very different sizes a small device counts as much as
a large one, and the median is a noisier estimator than the mean when nothing is attacked.

Memory: the accumulator holds k * num_params float32 values (FedAvg holds one float64
vector), and partial_state() persists all of them after every accepted update so the restart
contract holds: bound k with --target-devices. See docs/security-robust-dp.md.

The round record carries the norms of the deltas the rule holds (`update_norm_median`,
`update_norm_max`), computed at the close from the stack.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleetlearn.aggregator.clipping import l2_norm, norm_summary
from fleetlearn.aggregator.fedavg import weighted_mean
from fleetlearn.aggregator.strategy import Aggregate, Strategy
from fleetlearn.edge_runtime.core.protocol import Update


def coordinate_median(deltas: np.ndarray) -> np.ndarray:
    """median over axis 0 of a (k, P) stack, in float64: (P,)."""
    stack = np.asarray(deltas, dtype=np.float64)
    if stack.ndim != 2 or stack.shape[0] < 1:
        raise ValueError(f"need a (k >= 1, P) stack of deltas, got shape {stack.shape}")
    return np.median(stack, axis=0)


class CoordinateWise(Strategy):
    """Shared by the coordinate-wise rules: keep every delta (float32), combine at the close."""

    def __init__(self, options: Any = None):
        super().__init__(options)
        self._size: int | None = None
        self._deltas: list[np.ndarray] = []
        self._samples: list[int] = []
        self._losses: list[float] = []

    # the combining rule: (k, P) float32 stack -> (P,) float64 delta
    def combine(self, deltas: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        self._size = np.asarray(global_weights).size
        self._deltas, self._samples, self._losses = [], [], []

    def accumulate(self, update: Update) -> None:
        assert self._size is not None, "begin_round first"
        self._deltas.append(np.array(update.delta, dtype=np.float32))
        self._samples.append(int(update.samples))
        self._losses.append(float(update.train_loss))

    def aggregate(self) -> Aggregate:
        assert self._size is not None, "begin_round first"
        if not self._deltas:
            raise ValueError("no updates accumulated: a round needs at least one accepted update")
        return Aggregate(self.combine(np.stack(self._deltas)), 1.0)

    def partial_state(self) -> dict[str, Any]:
        assert self._size is not None, "begin_round first"
        stack = np.stack(self._deltas) if self._deltas else np.zeros((0, self._size), np.float32)
        return {"deltas": stack, "samples": list(self._samples), "losses": list(self._losses)}

    def load_partial_state(self, state: dict[str, Any]) -> None:
        assert self._size is not None, "begin_round first"
        stack = np.asarray(state["deltas"], dtype=np.float32)
        k = len(state["samples"])
        if stack.ndim != 2 or stack.shape != (k, self._size) or len(state["losses"]) != k:
            raise ValueError(f"saved deltas have shape {stack.shape}, expected ({k}, {self._size})")
        if any(not isinstance(n, int) or n < 1 for n in state["samples"]):
            raise ValueError("saved accumulator has a bad sample count")
        self._deltas = [row.copy() for row in stack]
        self._samples = list(state["samples"])
        self._losses = [float(v) for v in state["losses"]]

    def round_summary(self) -> dict[str, Any]:
        total = sum(self._samples)
        loss_sum = sum(float(n) * v for n, v in zip(self._samples, self._losses))
        return {
            "samples": total,
            "train_loss": weighted_mean(loss_sum, total),
            **norm_summary(None, 0, [l2_norm(d) for d in self._deltas]),
        }


class Median(CoordinateWise):
    """Coordinate-wise median of the deltas, unweighted."""

    name = "median"

    def combine(self, deltas: np.ndarray) -> np.ndarray:
        return coordinate_median(deltas)

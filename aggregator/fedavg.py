"""FedAvg (McMahan et al., 2017) as a streaming accumulator.

Devices send deltas d_i = w_i - w (their locally trained weights minus the round's global
weights) with their sample counts n_i. The next global model is the sample-weighted mean:

    w' = w + (sum_i n_i * d_i) / (sum_i n_i)

which equals sum_i n_i * w_i / sum_i n_i. We never hold more than one delta: the running
sum S = sum_i n_i * d_i is kept in float64 (num_params * 8 bytes, plus 1 MiB of block scratch
per core), so memory grows with the model, not with the number of devices, and summation order
changes the result by at most a few float64 ulps, far below float32 resolution. Each update is
folded in by aggregator/fold.py's blocked kernel (widen, scale and add in cache, no model-sized
temporaries, split over the cores for large models), bit-identical to `S += float64(d_i) * n_i`.

This file is the rule only. The round's training config (epochs, lr schedule) is the engine's
(aggregator/schedule.py); clipping and DP noise wrap this rule (clipping.py, dp_fedavg.py); a
server optimizer subclasses it and replaces `step` (fedavgm.py).

Uniform weighting (`uniform=True`, set by the DP wrapper only): S = sum_i d_i and the
denominator is the count k, because DP needs every device's weight bounded by 1
(aggregator/dp_fedavg.py). The record's `samples` and `train_loss` still use the n_i.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleetlearn.aggregator.fold import Folder, fold
from fleetlearn.aggregator.strategy import Aggregate, Strategy
from fleetlearn.edge_runtime.core.protocol import Update


def new_accumulator(num_params: int) -> np.ndarray:
    """S = 0, as float64."""
    return np.zeros(num_params, dtype=np.float64)


def weighted_sum_update(acc: np.ndarray, delta: np.ndarray, n: int, scale: float = 1.0, folder: Folder | None = None) -> None:
    """S <- S + n * (c * d), in place, in float64 (d is widened before the multiplies; c = `scale`,
    a wrapper's factor such as clipping's min(1, C/||d||), applied first: (float64(d) * c) * n).
    With `folder`, over its threads (bit-identical)."""
    if n < 1:
        raise ValueError(f"sample count must be >= 1, got {n}")
    if folder is None:
        fold(acc, delta, scale, float(n))
    else:
        folder.fold(acc, delta, scale, float(n))


def apply_mean_delta(weights: np.ndarray, acc: np.ndarray, total: int) -> np.ndarray:
    """w' = w + S / N, computed in float64 and rounded once to float32 (a new array)."""
    if total < 1:
        raise ValueError("no samples accumulated: a round needs at least one accepted update")
    return (np.asarray(weights, dtype=np.float64) + acc / float(total)).astype(np.float32)


def weighted_mean(value_sum: float, total: int) -> float:
    """sum_i n_i * v_i / sum_i n_i, from the running sum; NaN when nothing was accumulated."""
    return value_sum / total if total else float("nan")


class FedAvg(Strategy):
    """Sample-weighted mean of the deltas, streaming: Aggregate(S, N)."""

    name = "fedavg"

    def __init__(self, options: Any = None, uniform: bool = False):
        super().__init__(options)
        self.uniform = uniform  # DP-FedAvg's weighting: every device weighs 1
        self._acc: np.ndarray | None = None
        self._folder = Folder()  # fold.py's blocked kernel over this machine's cores
        self._total = 0  # sum of n_i (the record's samples)
        self._count = 0  # k, the denominator when uniform
        self._loss_sum = 0.0

    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        self._acc = new_accumulator(np.asarray(global_weights).size)
        self._total, self._count, self._loss_sum = 0, 0, 0.0

    def accumulate(self, update: Update) -> None:
        self.accumulate_scaled(update, 1.0)

    def accumulate_scaled(self, update: Update, factor: float) -> None:
        """S <- S + n_i * (factor * d_i) (uniform: + factor * d_i), without a scaled copy of d_i."""
        assert self._acc is not None, "begin_round first"
        if self.uniform:
            self._folder.fold(self._acc, update.delta, factor)
        else:
            weighted_sum_update(self._acc, update.delta, update.samples, factor, self._folder)
        self._total += update.samples
        self._count += 1
        self._loss_sum += float(update.samples) * update.train_loss

    def aggregate(self) -> Aggregate:
        assert self._acc is not None, "begin_round first"
        denominator = self._count if self.uniform else self._total
        if denominator < 1:
            raise ValueError("no samples accumulated: a round needs at least one accepted update")
        return Aggregate(self._acc, float(denominator))

    def partial_state(self) -> dict[str, Any]:
        assert self._acc is not None, "begin_round first"
        return {"total_samples": self._total, "loss_sum": self._loss_sum, "sum": self._acc, "accepted": self._count}

    def load_partial_state(self, state: dict[str, Any]) -> None:
        assert self._acc is not None, "begin_round first"
        acc = np.asarray(state["sum"], dtype=np.float64)
        if acc.shape != self._acc.shape:
            raise ValueError(f"saved accumulator has shape {acc.shape}, the model has {self._acc.shape}")
        total, loss_sum, count = state["total_samples"], state["loss_sum"], state["accepted"]
        if (
            not isinstance(total, int)
            or total < 0
            or not isinstance(count, int)
            or count < 0
            or not isinstance(loss_sum, (int, float))
        ):
            raise ValueError("saved accumulator has a bad sample count, update count or loss sum")
        self._acc = acc.copy()
        self._total, self._count, self._loss_sum = total, count, float(loss_sum)

    def round_summary(self) -> dict[str, Any]:
        return {"samples": self._total, "train_loss": weighted_mean(self._loss_sum, self._total)}

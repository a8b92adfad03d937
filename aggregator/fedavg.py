"""FedAvg (McMahan et al., 2017) as a streaming accumulator.

Devices send deltas d_i = w_i - w (their locally trained weights minus the round's global
weights) with their sample counts n_i. The next global model is the sample-weighted mean:

    w' = w + (sum_i n_i * d_i) / (sum_i n_i)

which equals sum_i n_i * w_i / sum_i n_i. We never hold more than one delta: the running
sum S = sum_i n_i * d_i is kept in float64 (num_params * 8 bytes), so memory grows with the
model, not with the number of devices, and summation order changes the result by at most a
few float64 ulps, far below float32 resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.protocol import RoundConfig, Update

from fleetlearn.aggregator.schedule import scheduled_lr
from fleetlearn.aggregator.strategy import Strategy


def new_accumulator(num_params: int) -> np.ndarray:
    """S = 0, as float64."""
    return np.zeros(num_params, dtype=np.float64)


def weighted_sum_update(acc: np.ndarray, delta: np.ndarray, n: int) -> None:
    """S <- S + n * d, in place, in float64 (d is widened before the multiply)."""
    if n < 1:
        raise ValueError(f"sample count must be >= 1, got {n}")
    acc += np.asarray(delta, dtype=np.float64) * float(n)


def apply_mean_delta(weights: np.ndarray, acc: np.ndarray, total: int) -> np.ndarray:
    """w' = w + S / N, computed in float64 and rounded once to float32 (a new array)."""
    if total < 1:
        raise ValueError("no samples accumulated: a round needs at least one accepted update")
    return (np.asarray(weights, dtype=np.float64) + acc / float(total)).astype(np.float32)


def weighted_mean(value_sum: float, total: int) -> float:
    """sum_i n_i * v_i / sum_i n_i, from the running sum; NaN when nothing was accumulated."""
    return value_sum / total if total else float("nan")


class FedAvg(Strategy):
    """Sample-weighted mean of the deltas. Options become the round config devices receive."""

    name = "fedavg"
    streaming = True

    def __init__(
        self,
        local_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        max_steps: int | None = None,
        lr_schedule: str = "constant",
        lr_min_factor: float = 0.1,
        total_rounds: int = 1,
        lr_warmup: int = 0,
    ):
        self.round_config = RoundConfig(local_epochs=local_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr)
        self.lr_schedule = lr_schedule
        self.lr_min_factor = lr_min_factor
        self.total_rounds = total_rounds
        self.lr_warmup = lr_warmup
        self._weights: np.ndarray | None = None
        self._acc: np.ndarray | None = None
        self._total = 0
        self._loss_sum = 0.0

    def configure_round(self, rnd: int, global_weights: np.ndarray) -> RoundConfig:
        c = self.round_config
        if c.lr is None or (self.lr_schedule == "constant" and not self.lr_warmup):
            return c
        lr = scheduled_lr(c.lr, rnd, self.total_rounds, self.lr_schedule, self.lr_min_factor, self.lr_warmup)
        return RoundConfig(local_epochs=c.local_epochs, max_steps=c.max_steps, batch_size=c.batch_size, lr=lr)

    def begin_round(self, global_weights: np.ndarray) -> None:
        self._weights = np.asarray(global_weights, dtype=np.float32)
        self._acc = new_accumulator(self._weights.size)
        self._total = 0
        self._loss_sum = 0.0

    def accumulate(self, update: Update) -> None:
        assert self._acc is not None, "begin_round first"
        weighted_sum_update(self._acc, update.delta, update.samples)
        self._total += update.samples
        self._loss_sum += float(update.samples) * update.train_loss

    def aggregate(self) -> np.ndarray:
        assert self._acc is not None and self._weights is not None, "begin_round first"
        return apply_mean_delta(self._weights, self._acc, self._total)

    def state_dict(self) -> dict[str, Any]:
        assert self._acc is not None, "begin_round first"
        return {"total_samples": self._total, "loss_sum": self._loss_sum, "sum": self._acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self._acc is not None, "begin_round first"
        acc = np.asarray(state["sum"], dtype=np.float64)
        if acc.shape != self._acc.shape:
            raise ValueError(f"saved accumulator has shape {acc.shape}, the model has {self._acc.shape}")
        total, loss_sum = state["total_samples"], state["loss_sum"]
        if not isinstance(total, int) or total < 0 or not isinstance(loss_sum, (int, float)):
            raise ValueError("saved accumulator has a bad sample count or loss sum")
        self._acc = acc.copy()
        self._total = total
        self._loss_sum = float(loss_sum)

    def round_summary(self) -> dict[str, Any]:
        return {"samples": self._total, "train_loss": weighted_mean(self._loss_sum, self._total)}

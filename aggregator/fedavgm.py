"""FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification"; the FedAvgM baseline of
Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2 with a momentum server
optimizer).

Round t, with global weights x_t, accepted deltas d_i = x_i - x_t and sample counts n_i:

    Delta_t = sum_i n_i d_i / sum_i n_i          pseudo-gradient: the sample-weighted mean delta
                                                 (FedAvg's aggregate; wrappers act before: clipping,
                                                 DP noise on the sum)
    v_t     = beta * v_{t-1} + Delta_t           server momentum, v_0 = 0
    x_{t+1} = x_t + eta * v_t                    server step

eta = `--server-lr` (default 1), beta = `--server-momentum` (default 0.9, Hsu et al.'s value).
beta = 0 and eta = 1 give FedAvg exactly. Reddi et al. write the pseudo-gradient with the
opposite sign (x_t - x_i) and descend; the update is the same. With beta close to 1 the step
approaches eta / (1 - beta) times the mean delta: lower eta accordingly.

Precision: v is kept in float64; x_{t+1} is computed in float64 and rounded once to float32.

Cross-round state: v (float64, num_params) is the server state. `step` updates it and
ModelStore.commit persists it in the same atomic commit as x_{t+1}, so an aggregator
SIGKILLed at any point resumes with the (x, v) pair of the last closed round and ends with
the weights of an uninterrupted run given the same updates (tests/test_fedavgm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.options import Options, option
from fleetlearn.aggregator.strategy import Aggregate


def momentum_step(
    weights: np.ndarray, velocity: np.ndarray, delta: np.ndarray, server_lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """(x + eta * v', v') with v' = beta * v + Delta; v' float64, x' float32 (new arrays)."""
    v = momentum * np.asarray(velocity, dtype=np.float64) + np.asarray(delta, dtype=np.float64)
    return (np.asarray(weights, dtype=np.float64) + server_lr * v).astype(np.float32), v


@dataclass(frozen=True)
class FedAvgMOptions(Options):
    server_lr: float = option(
        1.0,
        "--server-lr",
        float,
        "server optimizers: server learning rate eta",
        metavar="ETA",
        check=lambda v: 0 < v <= 10,
        bound="in (0, 10]",
    )
    server_momentum: float = option(
        0.9,
        "--server-momentum",
        float,
        "fedavgm: server momentum beta",
        metavar="BETA",
        check=lambda v: 0 <= v < 1,
        bound="in [0, 1)",
    )


class FedAvgM(FedAvg):
    """FedAvg's mean delta, applied through server momentum."""

    name = "fedavgm"
    Options = FedAvgMOptions

    def __init__(self, options: FedAvgMOptions | None = None, uniform: bool = False):
        super().__init__(options, uniform)
        self._velocity: np.ndarray | None = None  # v_{t-1}; None: zeros (no round closed yet)

    def step(self, weights: np.ndarray, agg: Aggregate) -> np.ndarray:
        size = np.asarray(weights).size
        v = self._velocity if self._velocity is not None else np.zeros(size, np.float64)
        if v.shape != (size,):
            raise ValueError(f"saved momentum has {v.size} values, the model {size}")
        new_w, self._velocity = momentum_step(weights, v, agg.delta(), self.options.server_lr, self.options.server_momentum)
        return new_w

    def state_dict(self) -> dict[str, Any]:
        return {} if self._velocity is None else {"velocity": self._velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._velocity = None
            return
        if set(state) != {"velocity"}:
            raise ValueError(f"the state dir holds server state {sorted(state)}, fedavgm keeps ['velocity']")
        v = np.asarray(state["velocity"], dtype=np.float64)
        if v.ndim != 1:
            raise ValueError(f"saved momentum has shape {v.shape}")
        self._velocity = v.copy()

"""FedYogi: Yogi as the server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2 with the FedYogi second moment; Yogi: Zaheer et al. 2018).

Round t, with global weights x_t, accepted deltas d_i = x_i - x_t and sample counts n_i:

    Delta_t = sum_i n_i d_i / sum_i n_i                                  pseudo-gradient (Alg. 2's Delta_t)
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t                        Alg. 2, first moment, m_{-1} = 0
    v_t     = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)  Alg. 2, FedYogi's line, v_{-1} = tau^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)                          Alg. 2, server step

Unlike Adam's, Yogi's v moves by an additive (1 - beta2) Delta_t^2 toward Delta_t^2, so a
sudden large pseudo-gradient does not wipe out the history of small ones (sign(0) = 0: v is
kept when it equals Delta_t^2). eta = `--server-lr` (default 0.01), beta1 = `--beta1` (0.9),
beta2 = `--beta2` (0.99), tau = `--tau` (1e-3). Precision, the restart contract and the shared
code: aggregator/adaptive.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetlearn.aggregator.adaptive import AdaptiveServerOpt, beta1_option, beta2_option, server_lr_option, tau_option
from fleetlearn.aggregator.options import Options


def yogi_second_moment(v: np.ndarray, delta_sq: np.ndarray, beta2: float) -> np.ndarray:
    """v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2) (float64, a new array)."""
    return v - (1.0 - beta2) * delta_sq * np.sign(v - delta_sq)


@dataclass(frozen=True)
class FedYogiOptions(Options):
    server_lr: float = server_lr_option()
    beta1: float = beta1_option()
    beta2: float = beta2_option()
    tau: float = tau_option()


class FedYogi(AdaptiveServerOpt):
    """FedAvg's mean delta, applied through Yogi on the server."""

    name = "fedyogi"
    Options = FedYogiOptions
    second_moment = staticmethod(yogi_second_moment)

"""FedAdam: Adam as the server optimizer (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2 with the FedAdam second moment).

Round t, with global weights x_t, accepted deltas d_i = x_i - x_t and sample counts n_i:

    Delta_t = sum_i n_i d_i / sum_i n_i                          pseudo-gradient (Alg. 2's Delta_t,
                                                                 sample-weighted; clipping / DP noise
                                                                 act on it first)
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t                Alg. 2, first moment, m_{-1} = 0
    v_t     = beta2 v_{t-1} + (1 - beta2) Delta_t^2              Alg. 2, FedAdam's line, v_{-1} = tau^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)                  Alg. 2, server step

eta = `--server-lr` (default 0.01), beta1 = `--beta1` (0.9), beta2 = `--beta2` (0.99), tau =
`--tau` (1e-3). Element-wise; no bias correction (as in the paper). Precision, the restart
contract (m, v committed with x_{t+1}) and the shared code: aggregator/adaptive.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetlearn.aggregator.adaptive import AdaptiveServerOpt, beta1_option, beta2_option, server_lr_option, tau_option
from fleetlearn.aggregator.options import Options


def adam_second_moment(v: np.ndarray, delta_sq: np.ndarray, beta2: float) -> np.ndarray:
    """v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2 (float64, a new array)."""
    return beta2 * v + (1.0 - beta2) * delta_sq


@dataclass(frozen=True)
class FedAdamOptions(Options):
    server_lr: float = server_lr_option()
    beta1: float = beta1_option()
    beta2: float = beta2_option()
    tau: float = tau_option()


class FedAdam(AdaptiveServerOpt):
    """FedAvg's mean delta, applied through Adam on the server."""

    name = "fedadam"
    Options = FedAdamOptions
    second_moment = staticmethod(adam_second_moment)

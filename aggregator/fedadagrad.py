"""FedAdagrad: Adagrad as the server optimizer (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2 with the FedAdagrad second moment).

Round t, with global weights x_t, accepted deltas d_i = x_i - x_t and sample counts n_i:

    Delta_t = sum_i n_i d_i / sum_i n_i                  pseudo-gradient (Alg. 2's Delta_t)
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t        Alg. 2, first moment, m_{-1} = 0 (beta1 = 0:
                                                         plain Adagrad on Delta_t)
    v_t     = v_{t-1} + Delta_t^2                        Alg. 2, FedAdagrad's line, v_{-1} = tau^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)          Alg. 2, server step

v only grows, so the effective step shrinks over the run. There is no beta2: `--beta2` with
this strategy is an error. eta = `--server-lr` (default 0.01), beta1 = `--beta1` (0.9), tau =
`--tau` (1e-3). Precision, the restart contract and the shared code: aggregator/adaptive.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetlearn.aggregator.adaptive import AdaptiveServerOpt, beta1_option, server_lr_option, tau_option
from fleetlearn.aggregator.options import Options


def adagrad_second_moment(v: np.ndarray, delta_sq: np.ndarray, beta2: float) -> np.ndarray:
    """v_t = v_{t-1} + Delta_t^2 (float64, a new array; beta2 unused)."""
    return v + delta_sq


@dataclass(frozen=True)
class FedAdagradOptions(Options):
    server_lr: float = server_lr_option()
    beta1: float = beta1_option()
    tau: float = tau_option()


class FedAdagrad(AdaptiveServerOpt):
    """FedAvg's mean delta, applied through Adagrad on the server."""

    name = "fedadagrad"
    Options = FedAdagradOptions
    second_moment = staticmethod(adagrad_second_moment)

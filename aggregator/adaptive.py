"""The adaptive server optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization",
ICLR 2021, arXiv:2003.00295), Algorithm 2: what FedAdagrad, FedYogi and FedAdam share.

Round t, with global weights x_t and the pseudo-gradient Delta_t (the sample-weighted mean
delta, FedAvg's aggregate; clipping and DP noise act before it, aggregator/registry.py):

    m_t     = beta1 * m_{t-1} + (1 - beta1) * Delta_t          (Alg. 2, first moment; m_{-1} = 0)
    v_t     = <the rule's second moment>                         (Alg. 2: one line per optimizer;
                                                                  v_{-1} = tau^2, the paper's v_{-1} >= tau^2)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)               (Alg. 2, server step)

The three rules differ only in v_t (each file holds its own, as a pure function):

    FedAdagrad  v_t = v_{t-1} + Delta_t^2                                     (fedadagrad.py)
    FedYogi     v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)   (fedyogi.py)
    FedAdam     v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2              (fedadam.py)

Squares, roots and divisions are element-wise. Delta_i = x_i - x_t (the devices' deltas), so
the step is an ascent along m_t, as in the paper's Algorithm 2. No bias correction (the paper
has none; Flower's FedAdam adds one). tau (`--tau`) bounds the per-coordinate step: it is at
most eta * |m_t| / tau, and it controls the degree of adaptivity (small tau: more adaptive).

Defaults: eta = 0.01 (`--server-lr`; Reddi et al. tune eta per task over 10^-3..10^0: with
eta = 1 a coordinate moves by up to ~1 per round, which wrecks a small model), beta1 = 0.9,
beta2 = 0.99, tau = 1e-3 (the paper's).

Precision: m and v are kept in float64; x_{t+1} is computed in float64 and rounded once to
float32. v stays > 0 (from v_{-1} = tau^2 > 0): Adagrad and Adam only add non-negative terms;
Yogi's v shrinks only when v_{t-1} > Delta_t^2, and then by (1 - beta2) Delta_t^2 < v_{t-1}.

Cross-round state: m and v (float64, num_params each). `step` updates them; ModelStore.commit
persists them in the same atomic commit as x_{t+1}, so an aggregator SIGKILLed at any point
resumes with the (x, m, v) of the last closed round and ends bit-identical to an uninterrupted
run given the same updates (tests/test_server_optimizers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.options import option
from fleetlearn.aggregator.strategy import Aggregate

# A rule's second moment: v_t from (v_{t-1}, Delta_t^2, beta2), float64 arrays (new array).
SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

DEFAULT_SERVER_LR = 0.01


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    """m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t, float64 (a new array)."""
    return beta1 * np.asarray(m, dtype=np.float64) + (1.0 - beta1) * np.asarray(delta, dtype=np.float64)


def adaptive_step(
    weights: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    delta: np.ndarray,
    second_moment: SecondMoment,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_{t+1} float32, m_t, v_t float64) from x_t, m_{t-1}, v_{t-1} and Delta_t; inputs untouched."""
    d = np.asarray(delta, dtype=np.float64)
    m_t = first_moment(m, d, beta1)
    v_t = second_moment(np.asarray(v, dtype=np.float64), d * d, beta2)
    x = np.asarray(weights, dtype=np.float64) + server_lr * m_t / (np.sqrt(v_t) + tau)
    return x.astype(np.float32), m_t, v_t


# The options every adaptive optimizer declares (one flag each, shared by field name with fedavgm's --server-lr).
def server_lr_option() -> Any:
    return option(
        DEFAULT_SERVER_LR,
        "--server-lr",
        float,
        "server optimizers: server learning rate eta",
        metavar="ETA",
        check=lambda v: 0 < v <= 10,
        bound="in (0, 10]",
    )


def beta1_option() -> Any:
    return option(
        0.9,
        "--beta1",
        float,
        "fedadam/fedyogi/fedadagrad: first-moment decay beta1",
        metavar="B1",
        check=lambda b: 0 <= b < 1,
        bound="in [0, 1)",
    )


def beta2_option() -> Any:
    return option(
        0.99,
        "--beta2",
        float,
        "fedadam/fedyogi: second-moment decay beta2",
        metavar="B2",
        check=lambda b: 0 <= b < 1,
        bound="in [0, 1)",
    )


def tau_option() -> Any:
    return option(
        1e-3,
        "--tau",
        float,
        "fedadam/fedyogi/fedadagrad: adaptivity tau (a coordinate moves at most eta |m| / tau)",
        metavar="TAU",
        check=lambda t: 0 < t <= 1,
        bound="in (0, 1]",
    )


class AdaptiveServerOpt(FedAvg):
    """FedAvg's mean delta as the pseudo-gradient, applied through an adaptive server step.

    A subclass names its rule, its Options and its `second_moment` (a staticmethod)."""

    second_moment: SecondMoment  # a staticmethod in each subclass (a callable attribute, not a method)

    def __init__(self, options: Any = None, uniform: bool = False):
        super().__init__(options, uniform)
        self._m: np.ndarray | None = None  # m_{t-1}; None: no round closed yet (m_{-1} = 0, v_{-1} = tau^2)
        self._v: np.ndarray | None = None

    @property
    def beta2(self) -> float:
        return float(getattr(self.options, "beta2", 0.0))  # FedAdagrad has none

    def step(self, weights: np.ndarray, agg: Aggregate) -> np.ndarray:
        size = np.asarray(weights).size
        tau = float(self.options.tau)
        m = self._m if self._m is not None else np.zeros(size, np.float64)
        v = self._v if self._v is not None else np.full(size, tau * tau, np.float64)
        if m.shape != (size,) or v.shape != (size,):
            raise ValueError(f"saved moments have {m.size}/{v.size} values, the model {size}")
        new_w, self._m, self._v = adaptive_step(
            weights,
            m,
            v,
            agg.delta(),
            type(self).second_moment,
            float(self.options.server_lr),
            float(self.options.beta1),
            self.beta2,
            tau,
        )
        return new_w

    def state_dict(self) -> dict[str, Any]:
        return {} if self._m is None else {"m": self._m, "v": self._v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._m = self._v = None
            return
        if set(state) != {"m", "v"}:
            raise ValueError(f"the state dir holds server state {sorted(state)}, {self.name} keeps ['m', 'v']")
        m, v = (np.asarray(state[k], dtype=np.float64) for k in ("m", "v"))
        if m.ndim != 1 or m.shape != v.shape or not (np.isfinite(m).all() and np.isfinite(v).all() and (v >= 0).all()):
            raise ValueError(f"saved moments have shapes {m.shape}/{v.shape} or hold non-finite/negative values")
        self._m, self._v = m.copy(), v.copy()

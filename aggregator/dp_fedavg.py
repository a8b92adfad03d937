"""DP-FedAvg with central differential privacy (McMahan, Ramage, Talwar, Zhang, ICLR 2018),
user-level: the unit protected is one device's whole contribution to a round.

Per round, with clip norm C (`--clip-norm`), noise multiplier sigma (`--dp-noise-multiplier`)
and m = the expected number of participants (`--target-devices`, = q * N):

    d~_i = clip(d_i, C) = d_i * min(1, C / ||d_i||_2)          (aggregator/clipping.py)
    S    = sum_i d~_i                                           (unweighted: no n_i)
    w'   = w + (S + z) / m,     z ~ N(0, (sigma * C)^2 I)

Sensitivity: adding or removing one device changes S by one clipped delta, so by at most C
in L2 norm, whatever the others sent; the Gaussian mechanism with std sigma * C on S is then
the GaussianDpEvent(sigma) of dp-accounting. Dividing by the FIXED m (McMahan et al.'s
"fixed-denominator" estimator with all weights 1) is post-processing and costs nothing;
dividing by the realised count k would make the denominator itself depend on who took part.
Sample-count weighting (n_i / sum n) is not used: a weight is data-dependent and unbounded
(self-reported up to 2^31 - 1), which breaks the C bound unless weights are capped, as the
paper's w_k = min(n_k / w^, 1) does; unweighted is the cap at 1.

Privacy spent after r rounds: r-fold composition of PoissonSampledDpEvent(q, GaussianDpEvent(
sigma)) with q = m / N (`--dp-population N`, default N = m, q = 1), converted to (epsilon,
delta) at `--dp-delta` by dp-accounting's RDP accountant (never hand-written math here). q < 1
claims amplification by Poisson sampling; the engine does not sample devices (the first m that
answer are taken), so only q = 1 describes what the code does. docs/security-robust-dp.md.

Restart contract: the noise z is drawn at aggregate() from a 128-bit seed chosen at
begin_round (secrets) and persisted in state_dict(), so "persist, crash, restart, load"
reproduces the same z and the bit-identical result.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.protocol import Update

from fleetlearn.aggregator.clipping import clip_delta, l2_norm, norm_summary
from fleetlearn.aggregator.fedavg import FedAvg, new_accumulator, weighted_mean

ACCOUNTANTS = ("rdp", "pld")


def gaussian_noise(seed_hex: str, size: int, std: float) -> np.ndarray:
    """z ~ N(0, std^2 I_size) in float64 from numpy's PCG64 seeded with the 128-bit `seed_hex`:
    the same seed gives the same z (within one numpy version)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    rng = np.random.Generator(np.random.PCG64(int(seed_hex, 16)))
    return rng.normal(0.0, std, size) if std > 0 else np.zeros(size, dtype=np.float64)


def noisy_mean_delta(clipped_sum: np.ndarray, noise: np.ndarray, expected_participants: float) -> np.ndarray:
    """(S + z) / m: the fixed-denominator DP-FedAvg estimate of the mean delta, float64."""
    if not expected_participants > 0:
        raise ValueError(f"expected participants must be > 0, got {expected_participants}")
    return (np.asarray(clipped_sum, dtype=np.float64) + noise) / float(expected_participants)


def dp_round_event(noise_multiplier: float, sampling_rate: float):
    """One round as a dp-accounting event: Poisson sampling at rate q of a Gaussian mechanism
    whose noise std is noise_multiplier times the L2 sensitivity."""
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, accountant: str = "rdp", orders: list[float] | None = None) -> float:
    """epsilon at `delta` after `rounds` compositions of dp_round_event(...), from dp-accounting's
    RDP (default) or PLD accountant. inf when sigma = 0; 0 after 0 rounds."""
    import dp_accounting
    from dp_accounting import pld, rdp

    if rounds < 0 or not 0 < sampling_rate <= 1 or not 0 < delta < 1 or noise_multiplier < 0:
        raise ValueError(f"bad accounting input: rounds={rounds}, q={sampling_rate}, delta={delta}, sigma={noise_multiplier}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    event = dp_accounting.SelfComposedDpEvent(dp_round_event(noise_multiplier, sampling_rate), rounds)
    if accountant == "rdp":
        acc = rdp.RdpAccountant(orders) if orders is not None else rdp.RdpAccountant()
    elif accountant == "pld":
        acc = pld.PLDAccountant()
    else:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "order excluded from the computation" notes, once per order
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl_log.setLevel(level)


class DPFedAvg(FedAvg):
    """Clip each delta to C, sum unweighted, add N(0, (sigma C)^2) to the sum, divide by m."""

    name = "dp-fedavg"
    streaming = True

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_participants: int,
        population: int | None = None,
        dp_delta: float = 1e-5,
        accountant: str = "rdp",
        **round_options: Any,
    ):
        super().__init__(**round_options)
        if not clip_norm > 0:
            raise ValueError(f"clip norm must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if expected_participants < 1:
            raise ValueError(f"expected participants must be >= 1, got {expected_participants}")
        population = expected_participants if population is None else population
        if population < expected_participants:
            raise ValueError(f"population {population} is below the expected participants {expected_participants}")
        if not 0 < dp_delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {dp_delta}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_participants = int(expected_participants)
        self.population = int(population)
        self.sampling_rate = self.expected_participants / self.population
        self.dp_delta = float(dp_delta)
        self.accountant = accountant
        self._round = 0
        self._sum: np.ndarray | None = None
        self._k = 0
        self._clipped = 0
        self._norms: list[float] = []
        self._seed = ""

    def configure_round(self, rnd: int, global_weights: np.ndarray):
        self._round = rnd  # rounds released so far, once this one closes
        return super().configure_round(rnd, global_weights)

    def begin_round(self, global_weights: np.ndarray) -> None:
        self._weights = np.asarray(global_weights, dtype=np.float32)
        self._sum = new_accumulator(self._weights.size)
        self._total, self._loss_sum = 0, 0.0  # samples / train_loss, for the round record only
        self._k, self._clipped, self._norms = 0, 0, []
        self._seed = secrets.token_hex(16)  # replaced by the persisted one after a restart

    def accumulate(self, update: Update) -> None:
        assert self._sum is not None, "begin_round first"
        self._norms.append(l2_norm(update.delta))
        clipped, was_clipped = clip_delta(update.delta, self.clip_norm)
        self._sum += clipped
        self._k += 1
        self._clipped += int(was_clipped)
        self._total += update.samples
        self._loss_sum += float(update.samples) * update.train_loss

    def aggregate(self) -> np.ndarray:
        assert self._sum is not None and self._weights is not None, "begin_round first"
        if self._k < 1:
            raise ValueError("no updates accumulated: a round needs at least one accepted update")
        z = gaussian_noise(self._seed, self._sum.size, self.noise_multiplier * self.clip_norm)
        return (np.asarray(self._weights, dtype=np.float64) + noisy_mean_delta(self._sum, z, self.expected_participants)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        assert self._sum is not None, "begin_round first"
        return {
            "total_samples": self._total, "loss_sum": self._loss_sum, "sum": self._sum,
            "accepted": self._k, "clipped": self._clipped, "norms": list(self._norms), "noise_seed": self._seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self._sum is not None, "begin_round first"
        total, loss_sum = state["total_samples"], state["loss_sum"]
        if not isinstance(total, int) or total < 0 or not isinstance(loss_sum, (int, float)):
            raise ValueError("saved accumulator has a bad sample count or loss sum")
        acc = np.asarray(state["sum"], dtype=np.float64)
        if acc.shape != self._sum.shape:
            raise ValueError(f"saved accumulator has shape {acc.shape}, the model has {self._sum.shape}")
        seed = state["noise_seed"]
        if not isinstance(seed, str) or len(seed) != 32:
            raise ValueError("saved accumulator has no 128-bit noise seed")
        int(seed, 16)
        self._sum = acc.copy()
        self._k, self._clipped = int(state["accepted"]), int(state["clipped"])
        self._norms = [float(v) for v in state["norms"]]
        self._seed = seed
        self._total, self._loss_sum = total, float(loss_sum)

    def epsilon(self, rounds: int | None = None) -> float:
        """Privacy spent after `rounds` released rounds (default: up to this one)."""
        r = self._round if rounds is None else rounds
        return dp_epsilon(self.noise_multiplier, self.sampling_rate, r, self.dp_delta, self.accountant)

    def round_summary(self) -> dict[str, Any]:
        return {
            "samples": self._total,
            "train_loss": weighted_mean(self._loss_sum, self._total),
            "epsilon": self.epsilon(),
            "delta": self.dp_delta,
            "noise_multiplier": self.noise_multiplier,
            "dp_sampling_rate": self.sampling_rate,
            "dp_expected_participants": self.expected_participants,
            "dp_accountant": self.accountant,
            **norm_summary(self.clip_norm, self._clipped, self._norms),
        }

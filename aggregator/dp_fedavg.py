"""DP-FedAvg with central differential privacy (McMahan, Ramage, Talwar, Zhang, ICLR 2018),
user-level: the unit protected is one device's whole contribution to a round.

`DPNoise` is a wrapper in the style of Flower's DifferentialPrivacyServerSideFixedClipping: it
wraps Clipping(C) around a mean-based rule (fedavg, or a server optimizer built on it such as
fedavgm) whose weighting the builder sets to uniform (aggregator/registry.py); the coordinate-
wise rules have no noise calibration here and are refused. The noise goes on the clipped sum,
before the division by m, and so before any server optimizer's step sees the mean delta.

Per round, with clip norm C (`--clip-norm`), noise multiplier sigma (`--dp-noise-multiplier`)
and m = the expected number of participants (the round's target: `--target-devices`, or
`--sample-size`):

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

Privacy spent after r rounds: the composition of round events PoissonSampledDpEvent(q_t,
GaussianDpEvent(sigma)), t = 1..r, converted to (epsilon, delta) at `--dp-delta` by
dp-accounting's RDP (or PLD) accountant (never hand-written math here), with q_t the round's
REAL sampling rate:
  * without client sampling every device is asked every round (the global model goes to all,
    the first m that answer are taken): q_t = 1, no amplification is claimed;
  * with `--sample-size` (aggregator/sampling.py; `--sample-fraction` is refused with DP, its
    target would move m) the engine tells the
    wrapper q_t = invited_t / connected_t (`set_sampling_rate`), the probability that a connected
    device was asked in round t. The cohort is a uniform sample without replacement of fixed size,
    which the accountant models as Poisson sampling at the same rate (the usual approximation;
    dp-accounting's RDP accountant has no fixed-size sampling under add/remove-one neighbours).
    Over-selection does not change q: every invited device may contribute. Amplification
    assumes the cohort is secret; the invitation and the record's `invited`/`devices` are
    published, so the amplified figure holds against an observer of the models only.
The rates of released rounds are cross-round state (`dp_sampling_rates`, committed with the
weights), so epsilon after a restart composes the rates the run really used; rounds with no
recorded rate (a state dir from before) count as q = 1, the worst case. docs/security-robust-dp.md.

Restart contract: the noise z is drawn at aggregate() from a 128-bit seed chosen at
begin_round (secrets) and persisted in the round's partial state, so "persist, crash,
restart, load" reproduces the same z and the bit-identical result.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlearn.aggregator.clipping import Clipping
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.options import Options, option
from fleetlearn.aggregator.strategy import Aggregate, Strategy, Wrapper, merge_states

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


def dp_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    orders: list[float] | None = None,
) -> float:
    """epsilon at `delta` after `rounds` compositions of dp_round_event(...), from dp-accounting's
    RDP (default) or PLD accountant. inf when sigma = 0; 0 after 0 rounds."""
    if rounds < 0:
        raise ValueError(f"bad accounting input: rounds={rounds}")
    return dp_epsilon_rates(
        noise_multiplier, [sampling_rate] * rounds if rounds else [], delta, accountant, orders, check_rate=sampling_rate
    )


def dp_epsilon_rates(
    noise_multiplier: float,
    rates: list[float],
    delta: float,
    accountant: str = "rdp",
    orders: list[float] | None = None,
    check_rate: float | None = None,
) -> float:
    """epsilon at `delta` after one dp_round_event(sigma, q) per entry of `rates` (rounds with
    equal rates are self-composed, so a long run costs one event per distinct rate)."""
    import dp_accounting
    from dp_accounting import pld, rdp

    bad_rate = [q for q in (*rates, *([check_rate] if check_rate is not None else [])) if not 0 < q <= 1]
    if bad_rate or not 0 < delta < 1 or noise_multiplier < 0:
        raise ValueError(
            f"bad accounting input: rounds={len(rates)}, q={bad_rate[:1] or rates[:1]}, delta={delta}, sigma={noise_multiplier}"
        )
    if not rates:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    counts: dict[float, int] = {}
    for q in rates:
        counts[float(q)] = counts.get(float(q), 0) + 1
    events = [dp_accounting.SelfComposedDpEvent(dp_round_event(noise_multiplier, q), n) for q, n in counts.items()]
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
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


@dataclass(frozen=True)
class DPOptions(Options):
    noise_multiplier: float | None = option(
        None,
        "--dp-noise-multiplier",
        float,
        "DP-FedAvg: add N(0, (SIGMA*C)^2) to the sum of clipped updates (needs --clip-norm)",
        metavar="SIGMA",
        check=lambda s: 0 < s < float("inf"),
        bound="a finite number > 0",
    )
    delta: float = option(
        1e-5, "--dp-delta", float, "delta at which epsilon is reported", check=lambda d: 0 < d < 1, bound="in (0, 1)"
    )
    accountant: str = option("rdp", "--dp-accountant", str, "privacy accountant of dp-accounting", choices=ACCOUNTANTS)


class DPNoise(Wrapper):
    """Around Clipping(C, FedAvg(uniform)): w' = w + (sum_i clip(d_i, C) + z) / m."""

    prefix = "dp"
    Options = DPOptions

    def __init__(self, inner: Strategy, options: DPOptions, expected_participants: int):
        super().__init__(inner)
        if not isinstance(inner, Clipping):
            raise ValueError("DP noise wraps Clipping: the noise is calibrated to the clip norm")
        if not (isinstance(inner.rule, FedAvg) and inner.rule.uniform):
            raise ValueError(f"DP noise needs a uniformly weighted mean at the core, not {inner.rule.name}")
        if options.noise_multiplier is None:
            raise ValueError("DP noise needs a noise multiplier")
        if expected_participants < 1:
            raise ValueError(f"expected participants must be >= 1, got {expected_participants}")
        self.options = options
        self.clip_norm = inner.clip_norm
        self.noise_multiplier = float(options.noise_multiplier)
        self.expected_participants = int(expected_participants)
        self.sampling_rate = 1.0  # this round's q: 1 unless the engine samples (set_sampling_rate)
        self._rates: list[float] = []  # q of released rounds 1, 2, ... (cross-round state)
        self.dp_delta = float(options.delta)
        self.accountant = options.accountant
        self._round = 0
        self._seed = ""

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"dp-{self.rule.name}"  # the clipping is part of DP: "dp-fedavg", not "dp-clipped-fedavg"

    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        self.inner.begin_round(rnd, global_weights)
        self._round = rnd  # rounds released so far, once this one closes
        self._seed = secrets.token_hex(16)  # replaced by the persisted one after a restart
        self.sampling_rate = 1.0

    def set_sampling_rate(self, q: float) -> None:
        if not 0 < q <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {q}")
        self.sampling_rate = float(q)

    def _history(self, rounds: int) -> list[float]:
        """q of rounds 1..rounds-1 (q = 1 where none was recorded), then this round's."""
        past = (self._rates + [1.0] * rounds)[: max(rounds - 1, 0)]
        return past + [self.sampling_rate] if rounds >= 1 else []

    def step(self, weights: np.ndarray, agg: Aggregate) -> np.ndarray:
        new_w = self.inner.step(weights, agg)
        self._rates = self._history(self._round)  # this round is released: its q becomes history
        return new_w

    def state_dict(self) -> dict[str, Any]:
        own = {"dp_sampling_rates": np.asarray(self._rates, dtype=np.float64)} if self._rates else {}
        return merge_states(self.inner.state_dict(), own)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rates = np.asarray(state.get("dp_sampling_rates", []), dtype=np.float64)
        if rates.ndim != 1 or not ((rates > 0) & (rates <= 1)).all():
            raise ValueError("saved DP sampling rates are not a list of values in (0, 1]")
        self._rates = [float(q) for q in rates]
        self.inner.load_state_dict({k: v for k, v in state.items() if k != "dp_sampling_rates"})

    def aggregate(self) -> Aggregate:
        s = self.inner.aggregate().total  # the unweighted sum of clipped deltas
        z = gaussian_noise(self._seed, s.size, self.noise_multiplier * self.clip_norm)
        # Aggregate.delta() is then noisy_mean_delta(S, z, m) = (S + z) / m.
        return Aggregate(np.asarray(s, dtype=np.float64) + z, float(self.expected_participants))

    def own_partial_state(self) -> dict[str, Any]:
        return {"noise_seed": self._seed}

    def load_own_partial_state(self, state: dict[str, Any]) -> None:
        seed = state["noise_seed"]
        if not isinstance(seed, str) or len(seed) != 32:
            raise ValueError("saved accumulator has no 128-bit noise seed")
        int(seed, 16)
        self._seed = seed

    def epsilon(self, rounds: int | None = None) -> float:
        """Privacy spent after `rounds` released rounds (default: up to this one)."""
        r = self._round if rounds is None else rounds
        return dp_epsilon_rates(self.noise_multiplier, self._history(r), self.dp_delta, self.accountant)

    def round_summary(self) -> dict[str, Any]:
        return {
            **self.inner.round_summary(),
            "epsilon": self.epsilon(),
            "delta": self.dp_delta,
            "noise_multiplier": self.noise_multiplier,
            "dp_sampling_rate": self.sampling_rate,
            "dp_expected_participants": self.expected_participants,
            "dp_accountant": self.accountant,
        }

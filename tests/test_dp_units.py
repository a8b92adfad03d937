"""DP-FedAvg's pieces: the accountant (dp-accounting) against published numbers, the clipped,
unweighted, noised mean, the sensitivity bound, and the seeded noise across a restart."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.aggregator.clipping import Clipping, ClippingOptions, clip_delta
from fleetlearn.aggregator.dp_fedavg import DPNoise, DPOptions, dp_epsilon, dp_epsilon_rates, gaussian_noise, noisy_mean_delta
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.median import Median
from fleetlearn.aggregator.model_store import (
    PartialRound,
    decode_partial,
    decode_server_state,
    encode_partial,
    encode_server_state,
)
from fleetlearn.aggregator.registry import make_strategy
from fleetlearn.edge_runtime.core.protocol import Update

# TensorFlow Privacy's compute_dp_sgd_privacy (tensorflow_privacy/privacy/analysis/
# compute_dp_sgd_privacy_lib.py) runs dp-accounting's RdpAccountant with these orders over
# steps = ceil(epochs * n / batch) compositions of PoissonSampled(q = batch / n, Gaussian(sigma));
# its test (compute_dp_sgd_privacy_test.py, test_compute_dp_sgd_privacy) pins the results below.
TFP_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64)) + [128, 256, 512]


@pytest.mark.parametrize(
    "n, batch, sigma, epochs, delta, published",
    [(60000, 150, 1.3, 15, 1e-5, 0.7242234026109595), (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842)],
)
def test_epsilon_matches_tensorflow_privacy_published_values(n, batch, sigma, epochs, delta, published):
    steps = int(math.ceil(epochs * n / batch))
    eps = dp_epsilon(sigma, batch / n, steps, delta, orders=TFP_ORDERS)
    assert eps == pytest.approx(published, rel=1e-9)


def test_mnist_dpsgd_tutorial_epsilon():
    """The classic: MNIST, q = 256/60000, sigma = 1.1, 60 epochs, delta = 1e-5. TF Privacy's
    tutorials/README.md prints epsilon = 2.92, computed with the RDP -> (eps, delta) conversion
    of the time (eps = min_a RDP(a) + log(1/delta)/(a - 1)). dp-accounting's RdpAccountant uses
    the tighter conversion of Canonne, Kamath and Steinke (2020, Prop. 12) and gives 2.597 for
    the same mechanism; its PLD accountant, tighter still, 2.38. Both must sit below 2.92."""
    q, steps, delta = 256 / 60000, 60 * 60000 // 256, 1e-5
    rdp = dp_epsilon(1.1, q, steps, delta)
    pld = dp_epsilon(1.1, q, steps, delta, accountant="pld")
    assert rdp == pytest.approx(2.5966, abs=1e-3)
    assert 2.3 < pld < rdp < 2.92


def test_epsilon_behaves():
    assert dp_epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert dp_epsilon(0.0, 1.0, 3, 1e-5) == math.inf
    by_round = [dp_epsilon(1.0, 1.0, r, 1e-5) for r in (1, 2, 5, 10)]
    assert by_round == sorted(by_round) and len(set(by_round)) == 4
    assert dp_epsilon(2.0, 1.0, 5, 1e-5) < dp_epsilon(1.0, 1.0, 5, 1e-5)
    assert dp_epsilon(1.0, 0.1, 5, 1e-5) < dp_epsilon(1.0, 1.0, 5, 1e-5)  # amplification by sampling
    # q = 1: r Gaussian releases at sigma are one Gaussian at sigma / sqrt(r) (exact for PLD).
    assert dp_epsilon(1.0, 1.0, 4, 1e-5, accountant="pld") == pytest.approx(
        dp_epsilon(0.5, 1.0, 1, 1e-5, accountant="pld"), rel=1e-2
    )
    with pytest.raises(ValueError):
        dp_epsilon(1.0, 1.5, 1, 1e-5)


def DPFedAvg(clip_norm, noise_multiplier, expected_participants, dp_delta=1e-5, accountant="rdp"):
    """--strategy fedavg --clip-norm C --dp-noise-multiplier S [...] with --target-devices m."""
    return make_strategy(
        "fedavg",
        target_devices=expected_participants,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        delta=dp_delta,
        accountant=accountant,
    )


def _update(delta, samples=10, device="d"):
    return Update(
        run_id="a" * 32,
        round=1,
        device_id=device,
        model_hash="b" * 64,
        samples=samples,
        train_loss=1.0,
        train_s=0.1,
        nonce=secrets.token_hex(16),
        delta=np.asarray(delta, np.float32),
    )


def test_dp_fedavg_is_clip_sum_noise_divide_by_expected_participants():
    rng = np.random.default_rng(3)
    P, C, sigma, m = 400, 0.5, 1.3, 5
    w = rng.normal(size=P).astype(np.float32)
    deltas = [rng.normal(0, s, P).astype(np.float32) for s in (0.001, 0.1, 1.0, 10.0)]  # k = 4 < m: a deadline close
    s = DPFedAvg(clip_norm=C, noise_multiplier=sigma, expected_participants=m)
    s.begin_round(1, w)
    for i, d in enumerate(deltas):
        s.accumulate(_update(d, samples=10**i, device=f"d{i}"))  # sample counts play no part
    seed = s.partial_state()["noise_seed"]
    S = sum(clip_delta(d, C)[0] for d in deltas)
    z = gaussian_noise(seed, P, sigma * C)
    want = (w.astype(np.float64) + (S + z) / m).astype(np.float32)
    got = s.step(w, s.aggregate())
    assert got.tobytes() == want.tobytes()
    assert s.aggregate().delta().tobytes() == noisy_mean_delta(S, z, m).tobytes()
    np.testing.assert_array_equal(s.step(w, s.aggregate()), got)  # same seed, same noise, every time
    summary = s.round_summary()
    assert summary["clipped"] == 3 and summary["epsilon"] == dp_epsilon(sigma, 1.0, 1, 1e-5) and summary["delta"] == 1e-5
    assert summary["samples"] == 1111 and summary["dp_sampling_rate"] == 1.0 and summary["noise_multiplier"] == sigma


def test_noise_has_the_calibrated_scale_and_fresh_seeds_each_round():
    z = gaussian_noise("0" * 31 + "1", 200_000, 0.75)
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(0.75, rel=0.01)
    s = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_participants=2)
    w = np.zeros(10, np.float32)
    seeds = set()
    for r in range(5):
        s.begin_round(r + 1, w)
        seeds.add(s.partial_state()["noise_seed"])
    assert len(seeds) == 5 and all(len(x) == 32 for x in seeds)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.just(16)), elements=st.floats(-1e4, 1e4, width=32)),
    hnp.arrays(np.float32, 16, elements=st.floats(-1e4, 1e4, width=32)),
    st.floats(0.01, 100),
)
def test_sensitivity_of_the_clipped_sum_is_c(others, extra, c):
    """Adding (or removing) any one device's update moves the clipped sum by at most C."""
    s_without = sum(clip_delta(d, c)[0] for d in others)
    s_with = s_without + clip_delta(extra, c)[0]
    assert np.linalg.norm(s_with - s_without) <= c * (1 + 1e-9)


def test_restart_mid_round_reproduces_the_noise_and_the_result():
    rng = np.random.default_rng(4)
    P = 500
    w = rng.normal(size=P).astype(np.float32)
    ups = [_update(rng.normal(0, 1, P), device=f"d{i}") for i in range(5)]
    a = DPFedAvg(clip_norm=2.0, noise_multiplier=0.8, expected_participants=5)
    a.load_state_dict({"dp_sampling_rates": np.array([0.1, 0.1])})  # rounds 1-2 sampled 5 of 50 connected devices
    a.begin_round(3, w)
    a.set_sampling_rate(0.1)  # ... and so does round 3
    for u in ups[:2]:
        a.accumulate(u)
    raw = encode_partial(PartialRound(run_id="a" * 32, round=3, accepted={}, strategy=a.partial_state()))
    for u in ups[2:]:
        a.accumulate(u)
    want = a.step(w, a.aggregate())

    b = DPFedAvg(clip_norm=2.0, noise_multiplier=0.8, expected_participants=5)
    b.load_state_dict(decode_server_state(encode_server_state("a" * 32, 2, {"dp_sampling_rates": np.array([0.1, 0.1])}))[2])
    b.begin_round(3, w)  # draws a new seed ...
    b.set_sampling_rate(0.1)  # the engine re-tells the round's rate from its persisted cohort
    b.load_partial_state(decode_partial(raw).strategy)  # ... which the persisted one replaces
    for u in ups[2:]:
        b.accumulate(u)
    assert b.step(w, b.aggregate()).tobytes() == want.tobytes()
    assert b.round_summary() == a.round_summary()
    assert a.round_summary()["epsilon"] == dp_epsilon(0.8, 0.1, 3, 1e-5)


def test_bad_construction():
    from fleetlearn.edge_runtime.core.errors import UsageError

    for kw in (dict(clip_norm=0), dict(noise_multiplier=-1), dict(dp_delta=1), dict(accountant="moments")):
        args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_participants=1) | kw
        with pytest.raises(UsageError):
            DPFedAvg(**args)
    # The wrapper itself refuses what its math cannot honour, whoever builds it.
    clip = ClippingOptions(1.0)
    for inner, m in (
        (Clipping(FedAvg(uniform=True), clip), 0),
        (Clipping(FedAvg(), clip), 2),
        (Clipping(Median(), clip), 2),
        (FedAvg(uniform=True), 2),
    ):
        with pytest.raises(ValueError):
            DPNoise(inner, DPOptions(noise_multiplier=1.0), expected_participants=m)
    with pytest.raises(ValueError):
        noisy_mean_delta(np.zeros(2), np.zeros(2), 0)


def test_epsilon_composes_the_real_per_round_sampling_rates():
    """Rounds with different q (client sampling: invited / connected) compose as their events do;
    checked against dp-accounting composing each round's event one by one."""
    import dp_accounting
    from dp_accounting import rdp

    rates = [0.1, 0.25, 0.1, 1.0, 0.25]
    acc = rdp.RdpAccountant()
    for q in rates:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.2)))
    want = acc.get_epsilon(1e-5)
    assert dp_epsilon_rates(1.2, rates, 1e-5) == pytest.approx(want, rel=1e-9)
    assert dp_epsilon(1.2, 0.1, 5, 1e-5) < dp_epsilon_rates(1.2, rates, 1e-5) < dp_epsilon(1.2, 1.0, 5, 1e-5)
    with pytest.raises(ValueError):
        dp_epsilon_rates(1.2, [0.5, 0.0], 1e-5)


def test_the_rates_of_released_rounds_are_cross_round_state():
    s = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_participants=2)
    w = np.zeros(4, np.float32)
    assert s.state_dict() == {}
    for rnd, q in ((1, 0.5), (2, 1.0), (3, 0.4)):
        s.begin_round(rnd, w)
        if q != 1.0:
            s.set_sampling_rate(q)  # without sampling the engine never calls it: q = 1
        s.accumulate(_update(np.ones(4)))
        s.step(w, s.aggregate())
        s.step(w, s.aggregate())  # idempotent within a round
    assert s.state_dict()["dp_sampling_rates"].tolist() == [0.5, 1.0, 0.4]
    assert s.round_summary()["epsilon"] == s.epsilon(3) == dp_epsilon_rates(1.0, [0.5, 1.0, 0.4], 1e-5)
    assert s.round_summary()["dp_sampling_rate"] == 0.4
    # A state dir without recorded rates counts the missing rounds as q = 1 (the worst case).
    t = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_participants=2)
    t.load_state_dict({})
    t.begin_round(3, w)
    t.set_sampling_rate(0.4)
    assert t.epsilon() == dp_epsilon_rates(1.0, [1.0, 1.0, 0.4], 1e-5)
    with pytest.raises(ValueError):
        t.set_sampling_rate(0.0)
    with pytest.raises(ValueError):
        t.load_state_dict({"dp_sampling_rates": np.array([1.5])})

"""Robust aggregation as pure functions and strategies: the math against numpy, clipping norms,
the restart contract through the model store's real partial-round encoding, and the option
wiring (defaults stay plain FedAvg; bad combinations are one-line usage errors)."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetlearn.aggregator.clipping import ClippedFedAvg, clip_delta, clip_factor, l2_norm
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.median import Median, coordinate_median
from fleetlearn.aggregator.model_store import PartialRound, decode_partial, encode_partial
from fleetlearn.aggregator.server import AggregatorConfig
from fleetlearn.aggregator.strategy import STRATEGIES, make_strategy
from fleetlearn.aggregator.strategy_options import strategy_options
from fleetlearn.aggregator.trimmed_mean import TrimmedMean, coordinate_trimmed_mean, trim_count
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import Update

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def _update(delta: np.ndarray, samples: int = 10, loss: float = 1.0, device: str = "dev-0") -> Update:
    return Update(run_id="a" * 32, round=1, device_id=device, model_hash="b" * 64, samples=samples, train_loss=loss, train_s=0.1, nonce=secrets.token_hex(16), delta=np.asarray(delta, np.float32))


# ------------------------------------------------------------------ pure functions


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 30)), elements=finite))
def test_coordinate_median_is_numpys_median(stack):
    np.testing.assert_array_equal(coordinate_median(stack), np.median(stack.astype(np.float64), axis=0))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 15), st.integers(1, 20)), elements=finite), st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.49]))
def test_trimmed_mean_drops_t_per_side_then_averages(stack, beta):
    k = stack.shape[0]
    t = int(np.floor(beta * k + 1e-9))
    want = np.sort(stack.astype(np.float64), axis=0)[t : k - t].mean(axis=0)
    np.testing.assert_allclose(coordinate_trimmed_mean(stack, beta), want, rtol=1e-12, atol=1e-9)


def test_trim_count_and_limits():
    assert [trim_count(k, 0.1) for k in (1, 9, 10, 19, 20, 30)] == [0, 0, 1, 1, 2, 3]
    assert trim_count(10, 0.3) == 3 and trim_count(3, 0.49) == 1 and trim_count(1, 0.49) == 0
    # beta -> 0.5 approaches the median; beta = 0 is the plain mean.
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert coordinate_trimmed_mean(x, 0.0)[0] == pytest.approx(22.0)
    assert coordinate_trimmed_mean(x, 0.2)[0] == pytest.approx(3.0)
    assert coordinate_trimmed_mean(x, 0.4)[0] == coordinate_median(x)[0] == 3.0
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError):
            trim_count(10, bad)


def test_median_ignores_one_huge_or_flipped_value_per_coordinate():
    honest = np.array([[1.0, -2.0], [1.2, -2.2], [0.8, -1.8], [1.1, -2.1]])
    for poison in ([1e6, -1e6], [-1e3, 1e3]):
        stack = np.vstack([honest, poison])
        m = coordinate_median(stack)
        assert np.all(m >= honest.min(0)) and np.all(m <= honest.max(0))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 200), elements=finite), st.floats(1e-3, 1e4))
def test_clipping_bounds_the_norm_and_keeps_the_direction(delta, c):
    clipped, was = clip_delta(delta, c)
    norm = np.linalg.norm(delta.astype(np.float64))
    assert l2_norm(delta) == pytest.approx(norm, rel=1e-12, abs=1e-300)
    assert l2_norm(clipped) <= c * (1 + 1e-12)
    assert was == (norm > c)
    if norm <= c:
        np.testing.assert_array_equal(clipped, delta.astype(np.float64))
    else:
        assert l2_norm(clipped) == pytest.approx(c, rel=1e-9)
        np.testing.assert_allclose(clipped * (norm / c), delta, rtol=1e-6, atol=1e-6 * norm)


def test_clip_factor():
    assert clip_factor(0.0, 1.0) == 1.0 and clip_factor(0.5, 1.0) == 1.0 and clip_factor(4.0, 1.0) == 0.25
    with pytest.raises(ValueError):
        clip_factor(1.0, 0.0)


# ------------------------------------------------------------------ strategies


def _run(strategy, w, updates):
    strategy.configure_round(1, w)
    strategy.begin_round(w)
    for u in updates:
        strategy.accumulate(u)
    return strategy.aggregate()


def test_strategies_compute_what_the_docstrings_say():
    rng = np.random.default_rng(0)
    w = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(0, s, 50).astype(np.float32) for s in (0.1, 0.2, 0.3, 5.0, 0.15)]
    ns = [5, 50, 7, 9, 30]
    ups = [_update(d, n, device=f"d{i}") for i, (d, n) in enumerate(zip(deltas, ns))]
    stack = np.stack(deltas).astype(np.float64)
    w0 = w.copy()
    np.testing.assert_array_equal(_run(Median(), w, ups), (w.astype(np.float64) + np.median(stack, 0)).astype(np.float32))
    t = TrimmedMean(trim_fraction=0.2)
    np.testing.assert_array_equal(_run(t, w, ups), (w.astype(np.float64) + np.sort(stack, 0)[1:4].mean(0)).astype(np.float32))
    assert t.round_summary()["trimmed"] == 1 and t.round_summary()["samples"] == sum(ns)
    c = 1.0
    clipped = [d * min(1.0, c / np.linalg.norm(d)) for d in stack]
    want = w.astype(np.float64) + sum(n * d for n, d in zip(ns, clipped)) / sum(ns)
    cf = ClippedFedAvg(clip_norm=c)
    np.testing.assert_allclose(_run(cf, w, ups), want.astype(np.float32), rtol=1e-6, atol=1e-7)
    s = cf.round_summary()
    assert s["clipped"] == sum(np.linalg.norm(d) > c for d in stack) and s["clip_norm"] == c and s["update_norm_max"] == pytest.approx(np.linalg.norm(stack, axis=1).max())
    # Median with clipping clips first.
    mc = Median(clip_norm=c)
    np.testing.assert_allclose(_run(mc, w, ups), (w.astype(np.float64) + np.median(np.stack([x.astype(np.float32) for x in clipped]).astype(np.float64), 0)).astype(np.float32), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(w, w0)  # aggregate() never modifies the weights it was given
    assert Median.streaming is False and TrimmedMean.streaming is False and ClippedFedAvg.streaming is True


def test_round_options_pass_through_like_fedavg():
    """The server's round options (epochs, lr schedule...) give every strategy FedAvg's config."""
    opts = dict(local_epochs=2, batch_size=16, lr=0.01, max_steps=None, lr_schedule="cosine", lr_min_factor=0.1, total_rounds=5)
    w = np.zeros(3, np.float32)
    want = [FedAvg(**opts).configure_round(r, w) for r in (1, 3, 5)]
    for name, extra in (("median", {}), ("trimmed-mean", {"trim_fraction": 0.2}), ("clipped-fedavg", {"clip_norm": 1.0}),
                        ("dp-fedavg", {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_participants": 3})):
        s = make_strategy(name, **opts, **extra)
        assert [s.configure_round(r, w) for r in (1, 3, 5)] == want, name


@pytest.mark.parametrize("make", [lambda: Median(), lambda: Median(clip_norm=0.5), lambda: TrimmedMean(0.2, clip_norm=0.7), lambda: ClippedFedAvg(0.5)])
def test_restart_mid_round_is_bit_identical_through_the_partial_encoding(make):
    """persist (the model store's real binary encoding), crash, restart, load: same bytes."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=300).astype(np.float32)
    ups = [_update(rng.normal(0, 0.5, 300), int(rng.integers(1, 100)), float(rng.random()), f"d{i}") for i in range(7)]
    whole = make()
    want = _run(whole, w, ups)
    a = make()
    a.configure_round(1, w)
    a.begin_round(w)
    for u in ups[:4]:
        a.accumulate(u)
    raw = encode_partial(PartialRound(run_id="a" * 32, round=1, accepted={}, strategy=a.state_dict()))
    b = make()
    b.configure_round(1, w)
    b.begin_round(w)
    b.load_state_dict(decode_partial(raw).strategy)
    for u in ups[4:]:
        b.accumulate(u)
    got = b.aggregate()
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert b.round_summary() == whole.round_summary()


def test_non_streaming_state_holds_every_delta():
    m = Median()
    w = np.zeros(1000, np.float32)
    m.begin_round(w)
    for i in range(5):
        m.accumulate(_update(np.full(1000, i, np.float32), device=f"d{i}"))
    st_ = m.state_dict()
    assert st_["deltas"].shape == (5, 1000) and st_["deltas"].dtype == np.float32  # k * num_params floats
    with pytest.raises(ValueError):
        m2 = Median()
        m2.begin_round(np.zeros(999, np.float32))
        m2.load_state_dict(st_)


# ------------------------------------------------------------------ options


def _cfg(tmp_path: Path, **kw) -> AggregatorConfig:
    base = dict(broker="mqtt://127.0.0.1:1883", state_dir=tmp_path, rounds=1, min_devices=2, bundle=tmp_path)
    return AggregatorConfig(**{**base, **kw})


def test_default_options_stay_plain_fedavg(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.validate()
    assert strategy_options(cfg) == ("fedavg", {})
    assert type(make_strategy("fedavg")) is FedAvg
    assert set(STRATEGIES) >= {"fedavg", "median", "trimmed-mean", "clipped-fedavg", "dp-fedavg"}


def test_options_resolve_to_strategies(tmp_path):
    assert strategy_options(_cfg(tmp_path, clip_norm=2.0)) == ("clipped-fedavg", {"clip_norm": 2.0})
    assert strategy_options(_cfg(tmp_path, strategy="median")) == ("median", {})
    assert strategy_options(_cfg(tmp_path, strategy="median", clip_norm=1.0)) == ("median", {"clip_norm": 1.0})
    assert strategy_options(_cfg(tmp_path, strategy="trimmed-mean", trim_fraction=0.2)) == ("trimmed-mean", {"trim_fraction": 0.2})
    name, extra = strategy_options(_cfg(tmp_path, target_devices=5, clip_norm=1.0, dp_noise_multiplier=1.1, dp_population=50))
    assert name == "dp-fedavg" and extra == {"clip_norm": 1.0, "noise_multiplier": 1.1, "expected_participants": 5, "population": 50, "dp_delta": 1e-5}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(strategy="krum"), "--strategy 'krum' is not one of"),
        (dict(clip_norm=0.0), "--clip-norm must be"),
        (dict(clip_norm=float("nan")), "--clip-norm must be"),
        (dict(strategy="trimmed-mean", trim_fraction=0.5), "--trim-fraction must be in [0, 0.5)"),
        (dict(dp_noise_multiplier=1.0), "--dp-noise-multiplier needs --clip-norm"),
        (dict(dp_noise_multiplier=-1.0, clip_norm=1.0), "--dp-noise-multiplier must be"),
        (dict(strategy="median", dp_noise_multiplier=1.0, clip_norm=1.0), "works with --strategy fedavg"),
        (dict(strategy="dp-fedavg"), "needs --dp-noise-multiplier"),
        (dict(strategy="clipped-fedavg"), "needs --clip-norm"),
        (dict(dp_delta=0.0, dp_noise_multiplier=1.0, clip_norm=1.0), "--dp-delta must be in (0, 1)"),
        (dict(dp_population=10), "--dp-population applies with --dp-noise-multiplier"),
        (dict(dp_population=1, dp_noise_multiplier=1.0, clip_norm=1.0), "--dp-population 1 is below --target-devices 2"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, kw, message):
    with pytest.raises(UsageError) as exc:
        _cfg(tmp_path, **kw).validate()
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_cli_flags_reach_the_config():
    import argparse

    from fleetlearn.aggregator.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--broker", "mqtt://127.0.0.1:1", "--rounds", "1", "--min-devices", "1", "--state-dir", "s", "--bundle", "b"]
    d = config_from_args(p.parse_args(base))
    assert (d.strategy, d.clip_norm, d.trim_fraction, d.dp_noise_multiplier, d.dp_delta, d.dp_population) == ("fedavg", None, 0.1, None, 1e-5, None)
    c = config_from_args(p.parse_args(base + ["--strategy", "trimmed-mean", "--clip-norm", "2.5", "--trim-fraction", "0.2", "--dp-delta", "1e-6", "--dp-population", "9"]))
    assert (c.strategy, c.clip_norm, c.trim_fraction, c.dp_delta, c.dp_population) == ("trimmed-mean", 2.5, 0.2, 1e-6, 9)
    assert config_from_args(p.parse_args(base + ["--dp-noise-multiplier", "1.1"])).dp_noise_multiplier == 1.1


def test_update_is_not_mutated_by_clipping():
    d = np.full(10, 3.0, np.float32)
    u = _update(d)
    cf = ClippedFedAvg(clip_norm=1.0)
    cf.begin_round(np.zeros(10, np.float32))
    cf.accumulate(u)
    assert np.all(u.delta == 3.0) and dataclasses.is_dataclass(u)

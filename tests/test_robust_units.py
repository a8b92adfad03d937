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

from fleetlearn.aggregator.clipping import Clipping, ClippingOptions, clip_delta, clip_factor, l2_norm
from fleetlearn.aggregator.config import AggregatorConfig, RoundPolicy
from fleetlearn.aggregator.dp_fedavg import DPNoise
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.median import Median, coordinate_median
from fleetlearn.aggregator.model_store import PartialRound, decode_partial, encode_partial
from fleetlearn.aggregator.registry import STRATEGIES, StrategyChoice, make_strategy
from fleetlearn.aggregator.schedule import TrainingPlan, scheduled_lr
from fleetlearn.aggregator.trimmed_mean import TrimmedMean, TrimmedMeanOptions, coordinate_trimmed_mean, trim_count
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import Update

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def _update(delta: np.ndarray, samples: int = 10, loss: float = 1.0, device: str = "dev-0") -> Update:
    return Update(
        run_id="a" * 32,
        round=1,
        device_id=device,
        model_hash="b" * 64,
        samples=samples,
        train_loss=loss,
        train_s=0.1,
        nonce=secrets.token_hex(16),
        delta=np.asarray(delta, np.float32),
    )


# ------------------------------------------------------------------ pure functions


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 30)), elements=finite))
def test_coordinate_median_is_numpys_median(stack):
    np.testing.assert_array_equal(coordinate_median(stack), np.median(stack.astype(np.float64), axis=0))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 15), st.integers(1, 20)), elements=finite),
    st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.49]),
)
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
    strategy.begin_round(1, w)
    for u in updates:
        strategy.accumulate(u)
    return strategy.step(w, strategy.aggregate())


def ClippedFedAvg(clip_norm):
    return Clipping(FedAvg(), ClippingOptions(clip_norm))


def test_strategies_compute_what_the_docstrings_say():
    rng = np.random.default_rng(0)
    w = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(0, s, 50).astype(np.float32) for s in (0.1, 0.2, 0.3, 5.0, 0.15)]
    ns = [5, 50, 7, 9, 30]
    ups = [_update(d, n, device=f"d{i}") for i, (d, n) in enumerate(zip(deltas, ns))]
    stack = np.stack(deltas).astype(np.float64)
    w0 = w.copy()
    np.testing.assert_array_equal(_run(Median(), w, ups), (w.astype(np.float64) + np.median(stack, 0)).astype(np.float32))
    t = TrimmedMean(TrimmedMeanOptions(trim_fraction=0.2))
    np.testing.assert_array_equal(_run(t, w, ups), (w.astype(np.float64) + np.sort(stack, 0)[1:4].mean(0)).astype(np.float32))
    assert t.round_summary()["trimmed"] == 1 and t.round_summary()["samples"] == sum(ns)
    c = 1.0
    clipped = [d * min(1.0, c / np.linalg.norm(d)) for d in stack]
    want = w.astype(np.float64) + sum(n * d for n, d in zip(ns, clipped)) / sum(ns)
    cf = ClippedFedAvg(clip_norm=c)
    np.testing.assert_allclose(_run(cf, w, ups), want.astype(np.float32), rtol=1e-6, atol=1e-7)
    s = cf.round_summary()
    assert (
        s["clipped"] == sum(np.linalg.norm(d) > c for d in stack)
        and s["clip_norm"] == c
        and s["update_norm_max"] == pytest.approx(np.linalg.norm(stack, axis=1).max())
    )
    # Median with clipping clips first.
    mc = make_strategy("median", clip_norm=c)
    assert mc.name == "clipped-median" and isinstance(mc, Clipping) and type(mc.rule) is Median
    np.testing.assert_allclose(
        _run(mc, w, ups),
        (w.astype(np.float64) + np.median(np.stack([x.astype(np.float32) for x in clipped]).astype(np.float64), 0)).astype(
            np.float32
        ),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_array_equal(w, w0)  # step() never modifies the weights it was given
    # The coordinate-wise rules report the norms of the deltas they hold (raw here), clipping the raw ones.
    assert mc.round_summary()["update_norm_max"] == pytest.approx(np.linalg.norm(stack, axis=1).max())
    assert t.round_summary()["update_norm_max"] == pytest.approx(np.linalg.norm(stack, axis=1).max())


def test_round_config_is_the_engines_not_the_strategys():
    """Each round's training config comes from the TrainingPlan (the engine's), whatever the
    strategy: epochs, batch, and the cosine-scheduled rate of the round."""
    plan = TrainingPlan(local_epochs=2, batch_size=16, lr=0.01, lr_schedule="cosine", lr_min_factor=0.1)
    got = [plan.round_config(r, 5, bundle_lr=0.5) for r in (1, 3, 5)]
    assert [c.lr for c in got] == [scheduled_lr(0.01, r, 5, "cosine", 0.1) for r in (1, 3, 5)]
    assert got[0].lr == 0.01 and got[2].lr < got[1].lr < got[0].lr
    assert all((c.local_epochs, c.batch_size, c.max_steps) == (2, 16, None) for c in got)
    # A schedule without --lr decays the bundle's own rate; no schedule and no --lr leaves the device's.
    assert TrainingPlan(lr_warmup=2).round_config(1, 5, bundle_lr=0.5).lr == 0.25
    assert TrainingPlan(local_epochs=2).round_config(3, 5, bundle_lr=0.5).to_meta() == {"local_epochs": 2}
    for name in ("median", "trimmed-mean", "clipped-fedavg", "dp-fedavg", "fedavgm"):
        assert not hasattr(
            make_strategy(name, clip_norm=1.0, noise_multiplier=1.0)
            if name == "dp-fedavg"
            else make_strategy(name, **({"clip_norm": 1.0} if name == "clipped-fedavg" else {})),
            "configure_round",
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: Median(),
        lambda: make_strategy("median", clip_norm=0.5),
        lambda: make_strategy("trimmed-mean", trim_fraction=0.2, clip_norm=0.7),
        lambda: ClippedFedAvg(0.5),
    ],
)
def test_restart_mid_round_is_bit_identical_through_the_partial_encoding(make):
    """persist (the model store's real binary encoding), crash, restart, load: same bytes."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=300).astype(np.float32)
    ups = [_update(rng.normal(0, 0.5, 300), int(rng.integers(1, 100)), float(rng.random()), f"d{i}") for i in range(7)]
    whole = make()
    want = _run(whole, w, ups)
    a = make()
    a.begin_round(1, w)
    for u in ups[:4]:
        a.accumulate(u)
    raw = encode_partial(PartialRound(run_id="a" * 32, round=1, accepted={}, strategy=a.partial_state()))
    b = make()
    b.begin_round(1, w)
    b.load_partial_state(decode_partial(raw).strategy)
    for u in ups[4:]:
        b.accumulate(u)
    got = b.step(w, b.aggregate())
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert b.round_summary() == whole.round_summary()


def test_non_streaming_state_holds_every_delta():
    m = Median()
    w = np.zeros(1000, np.float32)
    m.begin_round(1, w)
    for i in range(5):
        m.accumulate(_update(np.full(1000, i, np.float32), device=f"d{i}"))
    st_ = m.partial_state()
    assert st_["deltas"].shape == (5, 1000) and st_["deltas"].dtype == np.float32  # k * num_params floats
    assert m.state_dict() == {}  # no cross-round state
    with pytest.raises(ValueError):
        m2 = Median()
        m2.begin_round(1, np.zeros(999, np.float32))
        m2.load_partial_state(st_)


# ------------------------------------------------------------------ options


def _cfg(tmp_path: Path, strategy: str = "fedavg", target_devices: int | None = None, **options) -> AggregatorConfig:
    return AggregatorConfig(
        broker="mqtt://127.0.0.1:1883",
        state_dir=tmp_path,
        bundle=tmp_path,
        rounds=RoundPolicy(rounds=1, min_devices=2, target_devices=target_devices),
        strategy=StrategyChoice(strategy, options),
    )


def _shape(s) -> list:
    """A composition as [outermost ..., rule] class names with their options."""
    out = []
    while s is not None:
        out.append(type(s).__name__)
        s = getattr(s, "inner", None)
    return out


def test_default_options_stay_plain_fedavg(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.validate()
    assert type(cfg.strategy.build(cfg.rounds.target)) is FedAvg
    assert type(make_strategy("fedavg")) is FedAvg and not make_strategy("fedavg").uniform
    assert set(STRATEGIES) >= {"fedavg", "median", "trimmed-mean", "fedavgm"}


def test_options_compose_strategies(tmp_path):
    s = _cfg(tmp_path, clip_norm=2.0).strategy.build(2)
    assert _shape(s) == ["Clipping", "FedAvg"] and s.clip_norm == 2.0 and s.name == "clipped-fedavg"
    assert _shape(make_strategy("clipped-fedavg", clip_norm=2.0)) == ["Clipping", "FedAvg"]
    assert _shape(make_strategy("median")) == ["Median"]
    m = make_strategy("median", clip_norm=1.0)
    assert _shape(m) == ["Clipping", "Median"] and m.clip_norm == 1.0
    t = make_strategy("trimmed-mean", trim_fraction=0.2)
    assert _shape(t) == ["TrimmedMean"] and t.trim_fraction == 0.2
    assert make_strategy("trimmed-mean").trim_fraction == 0.1
    for name in ("fedavg", "dp-fedavg"):
        dp = _cfg(tmp_path, name, target_devices=5, clip_norm=1.0, noise_multiplier=1.1).strategy.build(5)
        assert isinstance(dp, DPNoise) and _shape(dp) == ["DPNoise", "Clipping", "FedAvg"] and dp.name == "dp-fedavg"
        assert (dp.clip_norm, dp.noise_multiplier, dp.expected_participants, dp.sampling_rate, dp.dp_delta) == (
            1.0,
            1.1,
            5,
            1.0,
            1e-5,
        )
        assert dp.rule.uniform  # DP-FedAvg weighs every device 1
    dpm = make_strategy("fedavgm", target_devices=3, clip_norm=1.0, noise_multiplier=1.0, server_momentum=0.5)
    assert (
        _shape(dpm) == ["DPNoise", "Clipping", "FedAvgM"] and dpm.name == "dp-fedavgm" and dpm.rule.options.server_momentum == 0.5
    )


@pytest.mark.parametrize(
    "strategy, kw, message",
    [
        (
            "krum",
            {},
            "--strategy 'krum' is not one of: fedavg, median, trimmed-mean, fedavgm, fedadam, fedyogi, fedadagrad, clipped-fedavg, dp-fedavg",
        ),
        ("fedavg", dict(clip_norm=0.0), "--clip-norm must be"),
        ("fedavg", dict(clip_norm=float("nan")), "--clip-norm must be"),
        ("trimmed-mean", dict(trim_fraction=0.5), "--trim-fraction must be in [0, 0.5)"),
        ("fedavg", dict(noise_multiplier=1.0), "--dp-noise-multiplier needs --clip-norm"),
        ("fedavg", dict(noise_multiplier=-1.0, clip_norm=1.0), "--dp-noise-multiplier must be"),
        ("median", dict(noise_multiplier=1.0, clip_norm=1.0), "works with --strategy fedavg"),
        ("dp-fedavg", {}, "needs --dp-noise-multiplier"),
        ("clipped-fedavg", {}, "needs --clip-norm"),
        ("fedavg", dict(delta=0.0, noise_multiplier=1.0, clip_norm=1.0), "--dp-delta must be in (0, 1)"),
        ("fedavg", dict(delta=1e-6), "--dp-delta applies with --dp-noise-multiplier"),
        (
            "fedavg",
            dict(population=10),
            "population does not apply to --strategy fedavg",
        ),  # --dp-population is gone: q is measured
        ("fedavg", dict(accountant="moments", noise_multiplier=1.0, clip_norm=1.0), "--dp-accountant must be one of rdp, pld"),
        (
            "fedavg",
            dict(trim_fraction=0.2),
            "--trim-fraction does not apply to --strategy fedavg; its options: --clip-norm, --dp-noise-multiplier",
        ),
        ("median", dict(server_momentum=0.5), "--server-momentum does not apply to --strategy median"),
        ("fedavgm", dict(server_momentum=1.0), "--server-momentum must be in [0, 1), got 1.0"),
        ("fedavgm", dict(server_lr=0.0), "--server-lr must be in (0, 10], got 0.0"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, strategy, kw, message):
    with pytest.raises(UsageError) as exc:
        _cfg(tmp_path, strategy, **kw).validate()
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _parser():
    import argparse

    from fleetlearn.aggregator.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


BASE = ["--broker", "mqtt://127.0.0.1:1", "--rounds", "1", "--min-devices", "1", "--state-dir", "s", "--bundle", "b"]


def test_cli_flags_reach_the_config():
    from fleetlearn.aggregator.cli import config_from_args

    p = _parser()
    d = config_from_args(p.parse_args(BASE))
    assert (d.strategy.name, dict(d.strategy.options)) == ("fedavg", {})  # only what was given
    c = config_from_args(
        p.parse_args(BASE + ["--strategy", "trimmed-mean", "--clip-norm", "2.5", "--trim-fraction", "0.2", "--dp-delta", "1e-6"])
    )
    assert (c.strategy.name, dict(c.strategy.options)) == (
        "trimmed-mean",
        {"clip_norm": 2.5, "trim_fraction": 0.2, "delta": 1e-6},
    )
    assert config_from_args(p.parse_args(BASE + ["--dp-noise-multiplier", "1.1"])).strategy.options == {"noise_multiplier": 1.1}
    m = config_from_args(
        p.parse_args(BASE + ["--strategy", "fedavgm", "--server-lr", "0.5", "--server-momentum", "0.8", "--local-epochs", "3"])
    )
    assert m.strategy.options == {"server_lr": 0.5, "server_momentum": 0.8} and m.training.local_epochs == 3
    assert m.link.client_id == "fleetlearn-aggregator-default" and not m.link.clean_session
    m.validate()


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    """Through the real `fleetlearn aggregator` entry: an unknown strategy and a foreign option."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    for extra, want in (
        (
            ["--strategy", "krum"],
            "--strategy 'krum' is not one of: fedavg, median, trimmed-mean, fedavgm, fedadam, fedyogi, fedadagrad, clipped-fedavg, dp-fedavg",
        ),
        (
            ["--strategy", "median", "--server-momentum", "0.9"],
            "--server-momentum does not apply to --strategy median; its options: --clip-norm",
        ),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "fleetlearn.cli", "aggregator", *BASE, *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        )
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("fleetlearn aggregator: error: ") and want in last, r.stderr


def test_update_is_not_mutated_by_clipping():
    d = np.full(10, 3.0, np.float32)
    u = _update(d)
    cf = ClippedFedAvg(clip_norm=1.0)
    cf.begin_round(1, np.zeros(10, np.float32))
    cf.accumulate(u)
    assert np.all(u.delta == 3.0) and dataclasses.is_dataclass(u)

"""FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021, Algorithm 2): each update rule pinned against
hand-computed steps, their moments through the model store's real commit, their composition
with clipping and DP noise (noise on the mean delta, before the optimizer), and bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetlearn.aggregator.adaptive import AdaptiveServerOpt
from fleetlearn.aggregator.clipping import Clipping
from fleetlearn.aggregator.dp_fedavg import DPNoise
from fleetlearn.aggregator.fedadagrad import FedAdagrad
from fleetlearn.aggregator.fedadam import FedAdam
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.fedyogi import FedYogi
from fleetlearn.aggregator.model_store import ModelStore
from fleetlearn.aggregator.registry import make_strategy
from fleetlearn.edge_runtime.core.errors import UsageError
from tests.test_fedavgm import _u  # one update builder for the server-optimizer tests


def _round(s, rnd, w, updates):
    s.begin_round(rnd, w)
    for i, (d, n) in enumerate(updates):
        s.accumulate(_u(d, n, f"d{i}", rnd))
    return s.step(w, s.aggregate())


# eta = 0.1, beta1 = 0.5, beta2 = 0.75, tau = 0.5 (v_{-1} = tau^2 = 0.25), w0 = (1, -1).
# Pseudo-gradients: r1 two updates (2, -2) n=1 and (0.5, -2) n=2 -> Delta = (2 + 1, -2 - 4) / 3 = (1, -2);
# r2 (0.5, 0) n=4; r3 (-1, 4) n=1. m is the same for all three rules:
#   m1 = 0.5 (1, -2) = (0.5, -1);  m2 = 0.5 m1 + 0.5 (0.5, 0) = (0.5, -0.5);  m3 = 0.5 m2 + 0.5 (-1, 4) = (-0.25, 1.75)
ROUNDS = [[([2.0, -2.0], 1), ([0.5, -2.0], 2)], [([0.5, 0.0], 4)], [([-1.0, 4.0], 1)]]
M = [(0.5, -1.0), (0.5, -0.5), (-0.25, 1.75)]
# v by hand, then w_t = w_{t-1} + 0.1 m_t / (sqrt(v_t) + 0.5):
HAND = {
    # Adam: v1 = 0.75*0.25 + 0.25*(1, 4) = (0.4375, 1.1875); v2 = 0.75 v1 + 0.25 (0.25, 0) = (0.390625, 0.890625);
    #       v3 = 0.75 v2 + 0.25 (1, 16) = (0.54296875, 4.66796875)
    #       w1 = (1 + 0.05/(sqrt(0.4375)+0.5), -1 - 0.1/(sqrt(1.1875)+0.5)) = (1.0430501, -1.0629040)
    "fedadam": (
        [(0.4375, 1.1875), (0.390625, 0.890625), (0.54296875, 4.66796875)],
        [(1.0430500874, -1.0629039718), (1.0874945318, -1.0975365029), (1.0672821259, -1.0317605863)],
    ),
    # Yogi: v1 = 0.25 - 0.25*(1, 4)*sign(0.25 - (1, 4)) = (0.5, 1.25)  -> w1 = (1 + (sqrt(2) - 1)/10, -1 - (sqrt(5) - 1)/20)
    #       v2 = (0.5 - 0.25*0.25*sign(0.5 - 0.25), 1.25 - 0) = (0.4375, 1.25)
    #       v3 = (0.4375 + 0.25*1, 1.25 + 0.25*16) = (0.6875, 5.25)
    "fedyogi": (
        [(0.5, 1.25), (0.4375, 1.25), (0.6875, 5.25)],
        [
            (1 + (math.sqrt(2) - 1) / 10, -1 - (math.sqrt(5) - 1) / 20),
            (1.0844714436, -1.0927050983),
            (1.0656625181, -1.0300100237),
        ],
    ),
    # Adagrad: v1 = 0.25 + (1, 4) = (1.25, 4.25); v2 = (1.5, 4.25); v3 = (2.5, 20.25) (sqrt 4.5 -> x3[1] = x2[1] + 0.175/5)
    "fedadagrad": (
        [(1.25, 4.25), (1.5, 4.25), (2.5, 20.25)],
        [(1.0309016994, -1.0390388203), (1.0598914943, -1.0585582305), (1.0478788406, -1.0585582305 + 0.175 / 5)],
    ),
}
OPTS = dict(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5)


@pytest.mark.parametrize("name", sorted(HAND))
def test_update_rule_pinned_against_hand_computed_steps(name):
    opts = {k: v for k, v in OPTS.items() if not (name == "fedadagrad" and k == "beta2")}
    s = make_strategy(name, **opts)
    assert isinstance(s, AdaptiveServerOpt) and s.name == name and s.state_dict() == {}
    w = np.array([1.0, -1.0], np.float32)
    for t, ups in enumerate(ROUNDS):
        w = _round(s, t + 1, w, ups)
        state = s.state_dict()
        assert w.dtype == np.float32 and state["m"].dtype == state["v"].dtype == np.float64
        np.testing.assert_allclose(state["m"], M[t], rtol=1e-12)
        np.testing.assert_allclose(state["v"], HAND[name][0][t], rtol=1e-12)
        np.testing.assert_allclose(w, np.array(HAND[name][1][t], np.float32), rtol=2e-7, atol=0)


def test_the_three_rules_differ_only_in_v():
    """Same m for all three, and with beta1 = 0 one step of each is eta * Delta / (sqrt(v1) + tau)."""
    w = np.zeros(3, np.float32)
    d = np.array([0.2, -0.4, 0.0])
    # beta1 = 0 -> m1 = Delta; v_{-1} = tau^2 = 1e-6; beta2 = 0.99 (default). For Yogi, d^2 > 1e-6 or d = 0 gives
    # the same v1 = 1e-6 + 0.01 d^2 (sign(1e-6 - d^2) = -1, or d^2 = 0).
    for cls, v1 in ((FedAdam, 0.99e-6 + 0.01 * d * d), (FedYogi, 1e-6 + 0.01 * d * d), (FedAdagrad, 1e-6 + d * d)):
        s = make_strategy(cls.name, server_lr=0.5, beta1=0.0, tau=1e-3)
        got = _round(s, 1, w, [(d, 3)])
        np.testing.assert_allclose(got, (0.5 * d / (np.sqrt(v1) + 1e-3)).astype(np.float32), rtol=1e-6)


def test_moments_commit_with_the_weights_and_survive_a_reopen(tmp_path):
    P, h = 40, "cd" * 32
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=P).astype(np.float32)
    rounds = [[(rng.normal(0, 0.1, P), int(rng.integers(1, 20))) for _ in range(3)] for _ in range(3)]
    whole, w = FedYogi(FedYogi.Options(server_lr=0.05)), w0
    for r, ups in enumerate(rounds, start=1):
        w = _round(whole, r, w, ups)
    store = ModelStore.open(tmp_path / "s", h, P, lambda: w0)
    a = FedYogi(FedYogi.Options(server_lr=0.05))
    for r in (1, 2):
        store.commit(r, _round(a, r, store.weights, rounds[r - 1]), {"round": r}, {}, a.state_dict())
    again = ModelStore.open(tmp_path / "s", h, P, lambda: w0)
    b = FedYogi(FedYogi.Options(server_lr=0.05))
    b.load_state_dict(again.server_state)
    assert sorted(again.server_state) == ["m", "v"]
    assert _round(b, 3, again.weights, rounds[2]).tobytes() == w.tobytes()
    with pytest.raises(ValueError, match="fedavgm keeps"):
        make_strategy("fedavgm").load_state_dict(again.server_state)
    with pytest.raises(ValueError, match="fedadam keeps"):
        FedAdam().load_state_dict({"velocity": np.zeros(P)})
    with pytest.raises(ValueError, match="non-finite/negative"):
        FedAdam().load_state_dict({"m": np.zeros(P), "v": -np.ones(P)})


def test_dp_noise_is_added_to_the_mean_delta_before_the_optimizer_sees_it():
    """DPNoise(Clipping(FedAdam(uniform))): Delta = (sum_i clip(d_i, C) + z) / m, then Adam.
    Recomputed here with numpy from the round's persisted noise seed."""
    C, sigma, m, P = 0.5, 0.7, 3, 64
    s = make_strategy("fedadam", target_devices=m, server_lr=0.2, tau=1e-2, clip_norm=C, noise_multiplier=sigma)
    assert isinstance(s, DPNoise) and isinstance(s.inner, Clipping) and isinstance(s.rule, FedAdam) and s.rule.uniform
    assert s.name == "dp-fedadam"
    rng = np.random.default_rng(11)
    w = rng.normal(size=P).astype(np.float32)
    ds = [rng.normal(0, 0.3, P).astype(np.float32) for _ in range(2)]
    s.begin_round(1, w)
    for i, d in enumerate(ds):
        s.accumulate(_u(d, 10 + i, f"d{i}"))
    seed = s.partial_state()["noise_seed"]
    got = s.step(w, s.aggregate())

    clipped = [d.astype(np.float64) * min(1.0, C / np.linalg.norm(d.astype(np.float64))) for d in ds]
    z = np.random.Generator(np.random.PCG64(int(seed, 16))).normal(0.0, sigma * C, P)
    delta = (sum(clipped) + z) / m  # unweighted, fixed denominator m, noise included
    m1 = 0.1 * delta
    v1 = 0.99 * 1e-4 + 0.01 * delta**2
    want = (w.astype(np.float64) + 0.2 * m1 / (np.sqrt(v1) + 1e-2)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.state_dict()["m"], m1, rtol=1e-12)
    # Without the noise (the same clipped deltas) the result differs: the optimizer saw z.
    quiet = (
        w.astype(np.float64) + 0.2 * (0.1 * sum(clipped) / m) / (np.sqrt(0.99e-4 + 0.01 * (sum(clipped) / m) ** 2) + 1e-2)
    ).astype(np.float32)
    assert np.abs(got - quiet).max() > 1e-4


def test_clipping_composes_and_keeps_the_optimizer_state():
    s = make_strategy("fedadagrad", clip_norm=0.1, server_lr=0.3)
    assert isinstance(s, Clipping) and s.name == "clipped-fedadagrad"
    w = np.zeros(2, np.float32)
    got = _round(s, 1, w, [([3.0, 4.0], 1)])  # clipped to (0.06, 0.08)
    d = np.array([0.06, 0.08])
    v1 = 1e-6 + d * d
    np.testing.assert_allclose(got, (0.3 * 0.1 * d / (np.sqrt(v1) + 1e-3)).astype(np.float32), rtol=1e-6)
    assert sorted(s.state_dict()) == ["m", "v"]


@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("fedavg", dict(beta1=0.9), "--beta1 does not apply to --strategy fedavg"),
        ("fedavgm", dict(tau=0.1), "--tau does not apply to --strategy fedavgm"),
        ("fedadagrad", dict(beta2=0.9), "--beta2 does not apply to --strategy fedadagrad"),
        ("fedadam", dict(server_momentum=0.9), "--server-momentum does not apply to --strategy fedadam"),
        ("median", dict(server_lr=0.1), "--server-lr does not apply to --strategy median"),
        ("fedadam", dict(beta1=1.0), "--beta1 must be in [0, 1), got 1.0"),
        ("fedyogi", dict(beta2=-0.1), "--beta2 must be in [0, 1), got -0.1"),
        ("fedadam", dict(tau=0.0), "--tau must be in (0, 1], got 0.0"),
        ("fedadagrad", dict(server_lr=0.0), "--server-lr must be in (0, 10], got 0.0"),
        ("fedadamw", {}, "is not one of: fedavg, median, trimmed-mean, fedavgm, fedadam, fedyogi, fedadagrad"),
        (
            "trimmed-mean",
            dict(noise_multiplier=1.0, clip_norm=1.0),
            "--dp-noise-multiplier works with --strategy fedavg / fedavgm / fedadam / fedyogi / fedadagrad",
        ),
    ],
)
def test_bad_options_are_one_line_usage_errors_listing_what_is_valid(name, opts, needle):
    with pytest.raises(UsageError) as exc:
        make_strategy(name, **opts)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    if "does not apply" in needle:
        assert "its options:" in str(exc.value)


def test_defaults_are_the_papers_and_fedavg_is_untouched():
    a = make_strategy("fedadam")
    assert (a.options.server_lr, a.options.beta1, a.options.beta2, a.options.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert type(make_strategy("fedavg")) is FedAvg and make_strategy("fedavgm").options.server_lr == 1.0


# ------------------------------------------------------------------ end to end, real devices


@pytest.mark.parametrize(
    "strategy, extra", [("fedyogi", ["--beta2", "0.95", "--sample-fraction", "1"]), ("fedadagrad", ["--clip-norm", "5"])]
)
def test_runs_end_to_end_with_real_devices(strategy, extra, mosquitto, tmp_path, boston_bundle, boston_shards):
    """2 real device processes, 2 rounds over mosquitto; the record names the strategy and carries
    the update norms, the moments are committed beside each round's weights. The fedyogi run also
    samples with --sample-fraction 1 (target max(2, ceil(1 x 2)) = 2, both invited)."""
    import json

    from fleetlearn.aggregator.model_store import decode_server_state
    from tests.conftest import stop_process
    from tests.procs import AggregatorProcess
    from tests.test_device import FLEET, start_device, write_config

    shards, test_npz = boston_shards
    state = tmp_path / "agg"
    agg = AggregatorProcess(
        tmp_path,
        mosquitto.url,
        FLEET,
        state,
        "--rounds",
        "2",
        "--min-devices",
        "2",
        "--deadline",
        "60",
        "--test-data",
        str(test_npz),
        "--strategy",
        strategy,
        "--server-lr",
        "0.02",
        "--beta1",
        "0.8",
        "--tau",
        "0.01",
        *extra,
        bundle=boston_bundle,
    )
    devices = []
    try:
        for i, shard in enumerate(shards[:2]):
            cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shard, device_id=f"dev-{i}")
            devices.append(start_device(cfg, tmp_path / f"dev-{i}.log", "--max-rounds", "2"))
        assert agg.wait(120) == 0, agg.text()[-3000:]
    finally:
        for proc in devices:
            stop_process(proc)
        agg.stop()
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    name = f"clipped-{strategy}" if "--clip-norm" in extra else strategy
    assert [r["round"] for r in rounds] == [1, 2] and all(
        r["strategy"] == name and r["devices"] == ["dev-0", "dev-1"] for r in rounds
    )
    assert all(0 < r["update_norm"] <= r["update_norm_max"] for r in rounds)
    sampled = "--sample-fraction" in extra
    assert all((r.get("invited"), r.get("connected")) == ((["dev-0", "dev-1"], 2) if sampled else (None, None)) for r in rounds)
    w = [np.fromfile(state / "global" / f"round_{r:04d}.f32", dtype="<f4") for r in range(3)]
    m1 = decode_server_state((state / "global" / "server_0001.bin").read_bytes())[2]
    # Round 1 from round 0 is the adaptive step, whatever the (unknown) mean delta was: with m_{-1} = 0,
    # |x1 - x0| = eta (1 - beta1) |Delta| / (sqrt(v1) + tau) per coordinate, and Delta = m1 / (1 - beta1).
    delta = m1["m"] / 0.2
    v1 = {"fedyogi": 1e-4 - 0.05 * delta**2 * np.sign(1e-4 - delta**2), "fedadagrad": 1e-4 + delta**2}[strategy]
    np.testing.assert_allclose(m1["v"], v1, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(
        w[1], (w[0].astype(np.float64) + 0.02 * m1["m"] / (np.sqrt(v1) + 0.01)).astype(np.float32), rtol=1e-6, atol=1e-7
    )
    assert not np.array_equal(w[1], w[2])

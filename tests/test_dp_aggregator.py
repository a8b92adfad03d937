"""DP-FedAvg in the real aggregator process on real mosquitto, driven by scripted device peers:
epsilon/delta in every round's record and on the retained metrics topic (from dp-accounting),
and a kill -9 mid-round whose restart reproduces the same noise and the same model bytes."""

from __future__ import annotations

import json
import secrets
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator.clipping import clip_delta
from fleetlearn.aggregator.dp_fedavg import dp_epsilon, gaussian_noise
from fleetlearn.aggregator.model_store import decode_partial
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Topics, Update
from tests.conftest import stop_process
from tests.peers import Peer
from tests.procs import AggregatorProcess

pytestmark = pytest.mark.mosquitto
FLEET = "dptest"
T = Topics(FLEET)


class Agg(AggregatorProcess):
    def __init__(self, tmp: Path, url: str, bundle: Path, state: Path, *extra: str):
        super().__init__(tmp, url, FLEET, state, *extra, bundle=bundle)


def _global(peer: Peer, rnd: int) -> GlobalModel:
    _, p = peer.wait_for(lambda t, p: t == T.global_model and bool(p) and GlobalModel.decode(p).round == rnd, timeout=60)
    return GlobalModel.decode(p)


def _update(g: GlobalModel, device: str, delta: np.ndarray, samples: int = 10) -> Update:
    return Update(
        run_id=g.run_id,
        round=g.round,
        device_id=device,
        model_hash=g.model_hash,
        samples=samples,
        train_loss=1.0,
        train_s=0.01,
        nonce=secrets.token_hex(16),
        delta=delta.astype(np.float32),
    )


def test_epsilon_and_delta_in_every_round_record_and_on_the_metrics_topic(mosquitto, boston_bundle, boston_shards, tmp_path):
    _, test_npz = boston_shards
    state = tmp_path / "state"
    # No client sampling: every device is asked every round, so the accountant uses q = 1 (the
    # sampled case, q = invited/connected, is tests/test_sampling.py's).
    dp = ["--clip-norm", "0.5", "--dp-noise-multiplier", "1.0", "--dp-delta", "1e-6"]
    agg = Agg(
        tmp_path,
        mosquitto.url,
        boston_bundle,
        state,
        "--rounds",
        "3",
        "--min-devices",
        "3",
        "--target-devices",
        "3",
        "--deadline",
        "30",
        "--test-data",
        str(test_npz),
        *dp,
    )
    # One observer per topic: round r+1's global model goes out before round r's metrics (those
    # follow its durable commit), and wait_for drops what it skips.
    obs, obs_metrics = Peer(mosquitto.url, [T.global_model]), Peer(mosquitto.url, [T.metrics])
    devices = {f"dev-{i}": Peer(mosquitto.url, [T.ack(f"dev-{i}")]) for i in range(3)}
    rng = np.random.default_rng(0)
    metrics = []
    try:
        for rnd in (1, 2, 3):
            g = _global(obs, rnd)
            for name, peer in devices.items():
                peer.publish(T.update(name), _update(g, name, rng.normal(0, 0.05, g.weights.size)).encode())
            _, m = obs_metrics.wait_for(lambda t, p: t == T.metrics and json.loads(p)["round"] == rnd, timeout=30)
            metrics.append(json.loads(m))
        assert agg.wait() == 0, agg.text()[-3000:]
    finally:
        stop_process(agg.proc)
        for p in [obs, obs_metrics, *devices.values()]:
            p.close()
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    want = [dp_epsilon(1.0, 1.0, r, 1e-6) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in records] == pytest.approx(want, rel=1e-12)
    assert want[0] < want[1] < want[2]
    assert [m["epsilon"] for m in metrics] == pytest.approx(want, rel=1e-12) and all(m["delta"] == 1e-6 for m in metrics)
    for r in records:
        assert r["strategy"] == "dp-fedavg" and r["delta"] == 1e-6 and r["noise_multiplier"] == 1.0 and r["clip_norm"] == 0.5
        assert r["dp_sampling_rate"] == 1.0 and r["clipped"] == 3 and np.isfinite(r["test_mse"])
    assert "event=round_closed round=3" in agg.text()


def test_kill_mid_round_restart_reproduces_the_same_noise(mosquitto, boston_bundle, tmp_path):
    state = tmp_path / "state"
    args = [
        "--rounds",
        "1",
        "--min-devices",
        "2",
        "--target-devices",
        "2",
        "--deadline",
        "30",
        "--clip-norm",
        "1.0",
        "--dp-noise-multiplier",
        "0.7",
    ]
    agg = Agg(tmp_path, mosquitto.url, boston_bundle, state, *args)
    obs = Peer(mosquitto.url, [T.global_model])
    a, b = Peer(mosquitto.url, [T.ack("dev-a")]), Peer(mosquitto.url, [T.ack("dev-b")])
    try:
        g = _global(obs, 1)
        rng = np.random.default_rng(5)
        da, db = rng.normal(0, 0.2, g.weights.size), rng.normal(0, 0.01, g.weights.size)  # |da| > C, |db| < C
        ua = _update(g, "dev-a", da)
        a.publish(T.update("dev-a"), ua.encode())
        a.wait_for(lambda t, p: Ack.decode(p).nonce == ua.nonce and Ack.decode(p).accepted)
        agg.proc.send_signal(signal.SIGKILL)  # killed right after it acked A
        agg.proc.wait(10)
        saved = decode_partial((state / "partial_round.bin").read_bytes()).strategy
        seed = saved["noise_seed"]
        assert isinstance(seed, str) and len(seed) == 32 and saved["accepted"] == 1 and saved["clipped"] == 1

        agg2 = Agg(tmp_path, mosquitto.url, boston_bundle, state, *args)
        end = time.monotonic() + 60
        while "event=round_resumed round=1" not in agg2.text():
            assert time.monotonic() < end, agg2.text()[-2000:]
            time.sleep(0.1)
        a.publish(T.update("dev-a"), ua.encode())  # the device re-sends: counted once
        ub = _update(g, "dev-b", db)
        b.publish(T.update("dev-b"), ub.encode())
        assert agg2.wait() == 0, agg2.text()[-3000:]
    finally:
        stop_process(agg.proc)
        for p in (obs, a, b):
            p.close()
    got = np.fromfile(state / "global" / "round_0001.f32", dtype="<f4")
    S = clip_delta(ua.delta, 1.0)[0] + clip_delta(ub.delta, 1.0)[0]
    want = (g.weights.astype(np.float64) + (S + gaussian_noise(seed, g.weights.size, 0.7 * 1.0)) / 2).astype(np.float32)
    assert got.tobytes() == want.tobytes()
    (rec,) = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert rec["devices"] == ["dev-a", "dev-b"] and rec["epsilon"] == pytest.approx(dp_epsilon(0.7, 1.0, 1, 1e-5))

"""Device-side (local) DP: the [privacy] table of the device config, the clip-and-noise
function, and a real device agent process that sends a clipped, noised delta."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.core.protocol import Update
from fleetlearn.edge_runtime.device.config import PrivacyConfig, parse_device_config
from fleetlearn.edge_runtime.device.privacy import clip_and_noise, privatize_delta
from tests.conftest import stop_process
from tests.peers import Peer
from tests.test_device import T, global_frame, initial_weights, start_device, write_config

BASE = {"device_id": "d", "fleet": "f", "broker": "mqtt://h:1883", "bundle": "b", "data": "x.npz", "state_dir": "s"}


def test_privacy_table_parses_and_checks():
    assert parse_device_config(BASE).privacy == PrivacyConfig()
    c = parse_device_config({**BASE, "privacy": {"clip_norm": 1, "local_noise_multiplier": 0.5}}).privacy
    assert c.clip_norm == 1 and c.local_noise_multiplier == 0.5
    for bad, msg in (
        ({"clip_norm": "1"}, "must be a number"),
        ({"clip_norm": 0.0}, "privacy.clip_norm' must be a number > 0"),
        ({"clip_norm": 1.0, "local_noise_multiplier": -1.0}, ">= 0"),
        ({"local_noise_multiplier": 1.0}, "needs 'privacy.clip_norm'"),
        ({"epsilon": 1.0}, "unknown key 'privacy.epsilon'"),
    ):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            parse_device_config({**BASE, "privacy": bad})


def test_clip_and_noise():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 1, 10_000).astype(np.float32)
    clipped, was = clip_and_noise(d, 2.0, 0.0, rng)
    assert was and clipped.dtype == np.float32 and np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(2.0, rel=1e-6)
    small = d * np.float32(1e-4)
    same, was = clip_and_noise(small, 2.0, 0.0, rng)
    assert not was and np.array_equal(same, small)
    noisy, _ = clip_and_noise(np.zeros(100_000, np.float32), 0.5, 3.0, rng)
    assert noisy.std() == pytest.approx(1.5, rel=0.01)  # s * C
    assert privatize_delta(d, PrivacyConfig()) is d  # no [privacy]: untouched
    a, b = privatize_delta(d, PrivacyConfig(1.0, 1.0)), privatize_delta(d, PrivacyConfig(1.0, 1.0))
    assert not np.array_equal(a, b)  # fresh OS-seeded noise each call


def test_device_agent_sends_a_clipped_noised_delta(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    C, s = 0.001, 1.0
    cfg.write_text(cfg.read_text() + f"\n[privacy]\nclip_norm = {C}\nlocal_noise_multiplier = {s}\n")
    peer = Peer(mosquitto.url, [T.all_updates])
    w0 = initial_weights(boston_bundle)
    peer.publish(T.global_model, global_frame(boston_bundle, secrets.token_hex(16), 1, w0), retain=True)
    proc = start_device(cfg, tmp_path / "device.log", "--max-rounds", "1")
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"), timeout=60)
    finally:
        stop_process(proc)
        peer.close()
    m = load_bundle(boston_bundle)
    u = Update.decode(payload, m.num_params)
    norm = float(np.linalg.norm(u.delta.astype(np.float64)))
    # A trained delta has norm ~1 here; clipped to 0.001 and noised with std 0.001 per coordinate
    # the update's norm is ~ sqrt(P) * s * C, and its mean ~ 0.
    expect = np.sqrt(m.num_params) * s * C
    assert 0.8 * expect < norm < 1.2 * expect + C, (norm, expect)
    assert abs(float(u.delta.mean())) < 5 * s * C / np.sqrt(m.num_params) + C / np.sqrt(m.num_params)

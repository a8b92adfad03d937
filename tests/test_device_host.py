"""A lone device on one thread (device/host.py): its publishes leave at once, the state write
that follows a send may lag behind the pending update file (recover_pending reads the frame),
and the engine serves the connection between training steps."""

from __future__ import annotations

import secrets
import time
import uuid

import numpy as np

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.data import load_dataset
from fleetlearn.edge_runtime.core.mqtt import LinkOptions
from fleetlearn.edge_runtime.core.mqtt_epoll import EpollLink, EpollLoop
from fleetlearn.edge_runtime.core.protocol import Update
from fleetlearn.edge_runtime.device.state import DeviceState, recover_pending, save_pending_update
from fleetlearn.edge_runtime.engines.select import open_engine
from tests.peers import Recorder


def _opts(url: str) -> LinkOptions:
    return LinkOptions(url=url, client_id=f"host-test-{uuid.uuid4().hex[:6]}", backoff_min=0.1, backoff_max=0.5)


def test_epoll_link_writes_a_publish_at_once_without_another_turn_of_the_loop(mosquitto):
    rec = Recorder(mosquitto.url, ["t/host/#"], "rec")
    loop = EpollLoop()
    link = EpollLink(_opts(mosquitto.url), on_message=lambda t, p: None, loop=loop)
    try:
        link.start()
        end = time.monotonic() + 10
        while not link.connected.is_set() and time.monotonic() < end:
            loop.run_once(0.05)
        assert link.connected.is_set()
        link.publish("t/host/a", b"x" * 7000, qos=1)
        assert not link.client.want_write(), "the publish waited for the next poll"
        # The loop does not turn while the message travels: it left inside publish().
        assert rec.wait(lambda t, p: t == "t/host/a" and p, timeout=10) == b"x" * 7000
    finally:
        link.stop()
        end = time.monotonic() + 5
        while link._sock_open and time.monotonic() < end:
            loop.run_once(0.05)
        loop.close()
        rec.close()


def _frame(run_id: str, rnd: int, nonce: str) -> bytes:
    delta = np.arange(5, dtype=np.float32)
    return Update(run_id, rnd, "dev-0", "a" * 64, 10, 0.5, 0.01, nonce, delta).encode()


def test_recover_pending_adopts_a_frame_newer_than_a_stale_state(tmp_path):
    """The state write after a send waits for a quiet moment: killed before it, the state still
    names the previous round's update, which the device settled before training this one."""
    run = secrets.token_hex(16)
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    DeviceState(run_id=run, last_round=2, pending_round=3, pending_nonce=old, pending_base=77, seen_round=3).save(tmp_path)
    save_pending_update(tmp_path, _frame(run, 4, new))
    state = DeviceState.load(tmp_path)
    assert recover_pending(tmp_path, state) == 4
    for s in (state, DeviceState.load(tmp_path)):  # in memory and saved
        assert (s.run_id, s.pending_round, s.pending_nonce, s.pending_base) == (run, 4, new, 0)
        assert s.last_round == 3 and s.seen_round == 4


def test_recover_pending_leaves_a_state_that_knows_its_frame(tmp_path):
    run, nonce = secrets.token_hex(16), secrets.token_hex(16)
    current = DeviceState(run_id=run, last_round=3, pending_round=4, pending_nonce=nonce, pending_base=9, seen_round=4)
    current.save(tmp_path)
    save_pending_update(tmp_path, _frame(run, 4, nonce))
    assert recover_pending(tmp_path, DeviceState.load(tmp_path)) == 0
    save_pending_update(tmp_path, _frame(run, 3, secrets.token_hex(16)))  # older than the state's: not adopted
    assert recover_pending(tmp_path, DeviceState.load(tmp_path)) == 0
    save_pending_update(tmp_path, _frame(secrets.token_hex(16), 9, secrets.token_hex(16)))  # another run's
    assert recover_pending(tmp_path, DeviceState.load(tmp_path)) == 0
    assert DeviceState.load(tmp_path) == current
    # With no pending update in the state, a frame past the last round is adopted (as before).
    DeviceState(run_id=run, last_round=4).save(tmp_path)
    save_pending_update(tmp_path, _frame(run, 5, nonce))
    state = DeviceState.load(tmp_path)
    assert recover_pending(tmp_path, state) == 5 and (state.pending_round, state.seen_round) == (5, 5)


def test_engine_serves_the_connection_between_training_steps(boston_bundle, boston_shards):
    """A lone device's loop does not poll while it trains: the engine calls `service` after
    every step (the host serves the socket there at most once a second: keepalive)."""
    shards, _ = boston_shards
    manifest = load_bundle(boston_bundle)
    engine = open_engine(boston_bundle, manifest, "auto")
    data = load_dataset(shards[0], manifest)
    calls = []
    result = engine.train(data, batch_size=16, service=lambda: calls.append(time.monotonic()))
    assert result.steps > 1 and len(calls) == result.steps

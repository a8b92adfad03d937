"""The aggregator as a real process on a real broker (mosquitto and the embedded amqtt broker),
driven by scripted protocol peers: paho clients in this test that publish real UPDATE frames
built with fleetlearn.edge_runtime.core.protocol and read the aggregator's acks, rounds and global models."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, BundleAnnouncement, GlobalModel, RoundState, Topics, Update, encode_chunk
from fleetlearn.edge_runtime.device.bundle_fetch import BundleAssembly
from tests.peers import Recorder
from tests.procs import AggregatorProcess

FLEET = "aggtest"
T = Topics(FLEET)
REQUIRED_FIELDS = {
    "round",
    "run_id",
    "devices",
    "samples",
    "train_loss",
    "test_mse",
    "wall_s",
    "bytes_in",
    "bytes_out",
    "deadline_extensions",
    "rejected",
}


class Peer(Recorder):
    """One scripted device (or observer): records every message on its device's topics."""

    def __init__(self, url: str, device: str = "observer", subscribe: tuple[str, ...] = ()):
        self.device = device
        super().__init__(url, (T.global_model, T.round, T.metrics, T.ack(device)) + tuple(subscribe), name=device)

    def global_model(self, rnd: int, timeout: float = 30.0) -> GlobalModel:
        return self.wait(lambda t, p: t == T.global_model and p and (g := GlobalModel.decode(p)).round == rnd and g, timeout)

    def round_state(self, rnd: int, state: str, timeout: float = 30.0) -> RoundState:
        return self.wait(
            lambda t, p: t == T.round and p and (s := RoundState.decode(p)).round == rnd and s.state == state and s, timeout
        )

    def ack(self, nonce: str, timeout: float = 30.0, nth: int = 1) -> Ack:
        def match(t, p):
            return t == T.ack(self.device) and (a := Ack.decode(p)).nonce == nonce and a

        acks = []
        end = time.monotonic() + timeout
        while len(acks) < nth:
            with self.cond:
                acks = [
                    a
                    for topic, p, _ in self.msgs
                    if topic == T.ack(self.device) and (a := _try(Ack.decode, p)) and a.nonce == nonce
                ]
                if len(acks) >= nth:
                    break
                if time.monotonic() > end:
                    raise TimeoutError(f"{self.device}: {len(acks)} acks for {nonce[:8]}, wanted {nth}")
                self.cond.wait(0.2)
        return acks[nth - 1]

    def acks(self) -> list[Ack]:
        with self.cond:
            return [Ack.decode(p) for t, p, _ in self.msgs if t == T.ack(self.device)]

    def send(self, payload: bytes, device: str | None = None) -> None:
        self.client.publish(T.update(device or self.device), payload, qos=1).wait_for_publish(10)

    def update(
        self, g: GlobalModel, delta: np.ndarray, samples: int, loss: float = 1.0, nonce: str | None = None, **kw
    ) -> Update:
        fields = dict(
            run_id=g.run_id,
            round=g.round,
            device_id=self.device,
            model_hash=g.model_hash,
            samples=samples,
            train_loss=loss,
            train_s=0.01,
            nonce=nonce or secrets.token_hex(16),
            delta=delta,
        )
        fields.update(kw)
        return Update(**fields)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


class Agg(AggregatorProcess):
    """`fleetlearn aggregator` on this file's fleet."""

    def __init__(self, tmp_path: Path, broker_url: str, bundle: Path | None, state: Path, *extra: str, name: str = "agg"):
        super().__init__(tmp_path, broker_url, FLEET, state, *extra, bundle=bundle, name=name)


@pytest.fixture
def agg_factory(tmp_path):
    started: list[Agg] = []
    peers: list[Peer] = []

    class Factory:
        def agg(self, *a, **kw) -> Agg:
            started.append(Agg(tmp_path, *a, **kw))
            return started[-1]

        def peer(self, *a, **kw) -> Peer:
            peers.append(Peer(*a, **kw))
            return peers[-1]

    yield Factory()
    for a in started:
        a.stop()
    for p in peers:
        p.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def rounds_log(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]


def state_weights(state: Path, rnd: int) -> np.ndarray:
    return np.fromfile(state / "global" / f"round_{rnd:04d}.f32", dtype="<f4")


def common(
    rounds: int, min_devices: int, target: int | None = None, deadline: float = 30, test_data: Path | None = None, *more: str
) -> list[str]:
    args = ["--rounds", str(rounds), "--min-devices", str(min_devices), "--deadline", str(deadline)]
    if target is not None:
        args += ["--target-devices", str(target)]
    if test_data is not None:
        args += ["--test-data", str(test_data)]
    return args + list(more)


# ---------------------------------------------------------------------------------------


def test_weighted_average_of_three_devices(any_broker, boston_bundle, boston_shards, tmp_path, agg_factory):
    """3 peers with different sample counts: the new global is numpy's w + sum(n d)/sum(n),
    on the retained global topic and in the state dir; rounds.jsonl has the required fields."""
    _, test_npz = boston_shards
    state = tmp_path / "state"
    agg = agg_factory.agg(
        any_broker.url, boston_bundle, state, *common(1, 3, 3, 30, test_npz, "--local-epochs", "2", "--batch-size", "16")
    )
    peers = [agg_factory.peer(any_broker.url, f"dev-{i}") for i in range(3)]
    g1 = peers[0].global_model(1)
    assert (
        g1.train and g1.total_rounds == 1 and g1.config.local_epochs == 2 and g1.config.batch_size == 16 and g1.config.lr is None
    )
    assert g1.model_hash == load_bundle(boston_bundle).model_hash
    rng = np.random.default_rng(7)
    samples = [11, 40, 153]
    losses = [3.0, 2.0, 1.0]
    deltas = [rng.normal(0, 0.05, g1.weights.size).astype(np.float32) for _ in peers]
    nonces = []
    for peer, d, n, loss in zip(peers, deltas, samples, losses):
        u = peer.update(g1, d, n, loss)
        nonces.append(u.nonce)
        peer.send(u.encode())
    for peer, nonce in zip(peers, nonces):
        a = peer.ack(nonce)
        assert a.accepted and a.round == 1 and a.run_id == g1.run_id and a.reason == ""
    assert agg.wait() == 0, agg.text()[-3000:]

    want = g1.weights.astype(np.float64) + sum(n * d.astype(np.float64) for n, d in zip(samples, deltas)) / sum(samples)
    observer = agg_factory.peer(any_broker.url)
    final = observer.global_model(2)
    assert not final.train and final.run_id == g1.run_id
    np.testing.assert_allclose(final.weights, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state_weights(state, 1), want, rtol=1e-6, atol=1e-7)
    assert final.weights.tobytes() == state_weights(state, 1).tobytes()
    assert observer.round_state(2, "finished").run_id == g1.run_id

    (rec,) = rounds_log(state)
    assert REQUIRED_FIELDS <= set(rec)
    assert rec["round"] == 1 and rec["devices"] == ["dev-0", "dev-1", "dev-2"] and rec["samples"] == sum(samples)
    assert rec["train_loss"] == pytest.approx(sum(n * l for n, l in zip(samples, losses)) / sum(samples))
    assert (
        rec["run_id"] == g1.run_id and rec["rejected"] == 0 and rec["deadline_extensions"] == 0 and rec["closed_by"] == "target"
    )
    assert rec["bytes_in"] >= 3 * 4 * g1.weights.size and rec["bytes_out"] >= 4 * g1.weights.size
    metrics = observer.wait(lambda t, p: t == T.metrics and json.loads(p))
    assert metrics["round"] == 1 and metrics["test_mse"] == rec["test_mse"] and metrics["v"] == 1

    # The test metric is the MSE of the final weights on the test set: check it against the
    # exported forward-only model run by plain onnxruntime inference.
    import onnxruntime as ort

    manifest = load_bundle(boston_bundle)
    with np.load(test_npz) as d:
        x, y = manifest.preprocessing.apply(d["x"].astype(np.float32)), d["y"].astype(np.float64)
    sess = ort.InferenceSession(str(state / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(y.shape)
    assert rec["test_mse"] == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-4)
    assert "event=round_closed round=1" in agg.text()


def test_silent_device_round_closes_at_deadline_with_min(any_broker, boston_bundle, tmp_path, agg_factory):
    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(1, 2, 3, 2.0))
    a, b = agg_factory.peer(any_broker.url, "dev-a"), agg_factory.peer(any_broker.url, "dev-b")
    g = a.global_model(1)
    t_open = time.time()
    for p in (a, b):
        p.send(p.update(g, np.zeros_like(g.weights), 10).encode())
    closed = a.round_state(1, "closed", timeout=20)
    assert closed.accepted == 2 and closed.target_devices == 3 and closed.min_devices == 2
    assert time.time() - t_open >= 1.5  # waited for the third device until the deadline
    assert agg.wait() == 0
    (rec,) = rounds_log(state)
    assert rec["devices"] == ["dev-a", "dev-b"] and rec["closed_by"] == "deadline" and rec["wall_s"] >= 1.9


def test_too_few_devices_extends_then_fails_with_exit_3(any_broker, boston_bundle, tmp_path, agg_factory):
    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(2, 2, None, 1.0, None, "--max-extensions", "1"))
    a = agg_factory.peer(any_broker.url, "dev-a")
    g = a.global_model(1)
    u = a.update(g, np.zeros_like(g.weights), 10)
    a.send(u.encode())
    assert a.ack(u.nonce).accepted
    failed = a.round_state(1, "failed", timeout=20)
    assert "1 of the 2 devices" in failed.reason
    assert agg.wait() == 3
    log = agg.text()
    assert "event=round_extended round=1" in log and "event=round_failed round=1" in log
    assert log.strip().splitlines()[-1].startswith("fleetlearn aggregator: error: round 1 failed")
    assert not (state / "rounds.jsonl").exists()
    assert (state / "partial_round.bin").exists()  # the accepted update survives for a restart


def test_duplicates_late_and_malformed_updates(any_broker, boston_bundle, tmp_path, agg_factory):
    """Each bad update is acked with accepted=false and its reason, logged, and changes nothing;
    a same-nonce re-send is acked accepted and counted once."""
    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(2, 2, 2, 30))
    a, b, c = (agg_factory.peer(any_broker.url, d) for d in ("dev-a", "dev-b", "dev-c"))
    g = a.global_model(1)
    n = g.weights.size
    da = np.full(n, 0.01, np.float32)
    ua = a.update(g, da, 10)
    a.send(ua.encode())
    assert a.ack(ua.nonce).accepted

    # The same update again (its ack was lost): accepted, counted once.
    a.send(ua.encode())
    again = a.ack(ua.nonce, nth=2)
    assert again.accepted and again.reason == "duplicate of an accepted update; counted once"
    # Another update from the same device in the same round: rejected.
    ua2 = a.update(g, da * 100, 1000)
    a.send(ua2.encode())
    assert a.ack(ua2.nonce).reason == "duplicate update for round 1" and not a.ack(ua2.nonce).accepted

    bad = {
        "truncated": (c.update(g, np.zeros(n, np.float32), 5).encode()[:-10], "truncated"),
        "wrong size": (c.update(g, np.zeros(n - 1, np.float32), 5).encode(), "parameters"),
        "nan": (c.update(g, np.full(n, np.nan, np.float32), 5).encode(), "NaN"),
        "oversized": (b"\0" * (24 + 8192 + (4 * n + 16) + 513), "bound"),  # body bound: float32 + the encodings' 16
        "wrong run": (c.update(g, np.zeros(n, np.float32), 5, run_id="e" * 32).encode(), "not the current run"),
        "wrong model": (c.update(g, np.zeros(n, np.float32), 5, model_hash="cd" * 32).encode(), "not the current model"),
        "future round": (c.update(g, np.zeros(n, np.float32), 5, round=2).encode(), "round 2 not open"),
        "garbage": (b"hello", "truncated frame"),
    }
    for what, (payload, reason) in bad.items():
        c.send(payload)
        ack = c.wait(lambda t, p: t == T.ack("dev-c") and reason in (x := Ack.decode(p)).reason and x, timeout=15)
        assert not ack.accepted, what
    # A device id in the meta that is not the topic's: answered on the topic's device.
    c.send(a.update(g, np.zeros(n, np.float32), 5).encode(), device="dev-c")
    assert (
        "does not match the topic"
        in c.wait(lambda t, p: t == T.ack("dev-c") and "topic" in (x := Ack.decode(p)).reason and x).reason
    )

    ub = b.update(g, np.full(n, 0.04, np.float32), 30)
    b.send(ub.encode())
    assert b.ack(ub.nonce).accepted
    g2 = a.global_model(2)
    np.testing.assert_allclose(
        g2.weights,
        g.weights.astype(np.float64) + (10 * da[0].astype(np.float64) + 30 * np.float64(np.float32(0.04))) / 40,
        rtol=1e-6,
        atol=1e-7,
    )

    # Round 1 is closed now: a late update is rejected; a re-send of a counted one is acked.
    late = c.update(g, np.zeros(n, np.float32), 5)
    c.send(late.encode())
    assert not c.ack(late.nonce).accepted and "round 1 closed" in c.ack(late.nonce).reason
    a.send(ua.encode())
    resent = a.ack(ua.nonce, nth=3)
    assert resent.accepted and "counted before it closed" in resent.reason

    for p, d in ((a, 0.0), (b, 0.0)):
        p.send(p.update(g2, np.full(n, d, np.float32), 3).encode())
    assert agg.wait() == 0, agg.text()[-3000:]
    r1, r2 = rounds_log(state)
    assert r1["devices"] == ["dev-a", "dev-b"] and r1["samples"] == 40
    assert r1["rejected"] == len(bad) + 2  # + the other-nonce duplicate and the topic mismatch
    assert r2["rejected"] == 1  # the late round-1 update arrived while round 2 was open
    log = agg.text()
    assert log.count("event=update_rejected") == len(bad) + 3
    assert all(
        line.count("round=") == 1 and "device=" in line and "reason=" in line
        for line in log.splitlines()
        if "event=update_rejected" in line
    )


def test_restart_between_rounds_resumes_bit_identical(any_broker, boston_bundle, tmp_path, agg_factory):
    state = tmp_path / "state"
    args = common(3, 1, 1, 30)
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *args)
    a = agg_factory.peer(any_broker.url, "dev-a")
    g1 = a.global_model(1)
    u1 = a.update(g1, np.random.default_rng(0).normal(0, 0.1, g1.weights.size).astype(np.float32), 17)
    a.send(u1.encode())
    g2 = a.global_model(2)
    # Round 2 opens before round 1 is durable (aggregator/commit_writer.py); round 1's ack says it is.
    assert a.ack(u1.nonce).accepted
    agg.kill9()
    before = state_weights(state, 1)
    assert before.tobytes() == g2.weights.tobytes()

    agg2 = agg_factory.agg(any_broker.url, boston_bundle, state, *args, name="agg2")
    # The restarted aggregator republishes round 2's global model: same run, same bytes.
    wait_until(lambda: "event=round_open round=2" in agg2.text())
    assert "resumed_after=1" in agg2.text()
    watcher = agg_factory.peer(any_broker.url, "dev-w")
    fresh = watcher.global_model(2)
    assert fresh.run_id == g1.run_id and fresh.weights.tobytes() == before.tobytes()
    for rnd in (2, 3):
        g = watcher.global_model(rnd)
        a.send(a.update(g, np.full(g.weights.size, 0.001, np.float32), 5).encode())
    assert agg2.wait() == 0, agg2.text()[-3000:]
    log = rounds_log(state)
    assert [r["round"] for r in log] == [1, 2, 3] and len({r["run_id"] for r in log}) == 1
    # Started again on a finished state dir: republishes the final model and exits 0 at once.
    agg3 = agg_factory.agg(any_broker.url, boston_bundle, state, *args, name="agg3")
    assert agg3.wait(30) == 0 and rounds_log(state) == log
    final = agg_factory.peer(any_broker.url).global_model(4)
    assert not final.train and final.weights.tobytes() == state_weights(state, 3).tobytes()


def test_kill_after_ack_mid_round_counts_the_update_once(any_broker, boston_bundle, tmp_path, agg_factory):
    state = tmp_path / "state"
    args = common(1, 2, 2, 30)
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *args)
    a, b = agg_factory.peer(any_broker.url, "dev-a"), agg_factory.peer(any_broker.url, "dev-b")
    g = a.global_model(1)
    n = g.weights.size
    ua = a.update(g, np.full(n, 0.3, np.float32), 10)
    a.send(ua.encode())
    assert a.ack(ua.nonce).accepted
    agg.kill9()  # killed right after it acked A

    agg2 = agg_factory.agg(any_broker.url, boston_bundle, state, *args, name="agg2")
    wait_until(lambda: "event=round_resumed round=1" in agg2.text() and "event=round_open round=1" in agg2.text())
    # The device re-sends (it re-sends whenever a round is re-announced): counted once.
    a.send(ua.encode())
    dup = a.ack(ua.nonce, nth=2)
    assert dup.accepted and "counted once" in dup.reason
    ub = b.update(g, np.full(n, -0.1, np.float32), 30)
    b.send(ub.encode())
    assert b.ack(ub.nonce).accepted
    assert agg2.wait() == 0, agg2.text()[-3000:]
    (rec,) = rounds_log(state)
    assert rec["devices"] == ["dev-a", "dev-b"] and rec["samples"] == 40
    want = g.weights.astype(np.float64) + (10 * 0.3 + 30 * -0.1) / 40
    np.testing.assert_allclose(state_weights(state, 1), want, rtol=1e-6, atol=1e-7)


def test_bundle_is_distributed_and_an_old_runs_chunks_are_cleared(any_broker, boston_bundle, tmp_path, agg_factory):
    # An older run of another model left its bundle retained on this fleet.
    old_hash = "cd" * 32
    seeder = agg_factory.peer(any_broker.url, "seeder")
    old = BundleAnnouncement(old_hash, {}, (), 3000, 1024, 3)
    for i in range(3):
        seeder.client.publish(
            T.bundle_chunk(old_hash, i), encode_chunk(old_hash, i, 3, b"x" * 1000), qos=1, retain=True
        ).wait_for_publish(5)
    seeder.client.publish(T.bundle, old.encode(), qos=1, retain=True).wait_for_publish(5)

    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(1, 1, 1, 30, None, "--chunk-size", "4096"))
    dev = agg_factory.peer(any_broker.url, "dev-new", subscribe=(T.bundle,))
    manifest = load_bundle(boston_bundle)
    ann = dev.wait(lambda t, p: t == T.bundle and (x := BundleAnnouncement.decode(p)).model_hash == manifest.model_hash and x)
    assert ann.chunk_size == 4096 and ann.chunks > 1
    g = dev.global_model(1)
    wait_until(lambda: "event=old_bundle_cleared" in agg.text())

    fetch = agg_factory.peer(
        any_broker.url, "fetcher", subscribe=(T.bundle_chunks(manifest.model_hash), T.bundle_chunks(old_hash))
    )
    assembly = BundleAssembly(ann)
    fetch.wait(
        lambda t, p: (t.startswith(T.bundle + "/" + manifest.model_hash) and p and assembly.add(p)) or assembly.complete,
        timeout=30,
    )
    assert assembly.install(tmp_path / "fetched").model_hash == manifest.model_hash
    time.sleep(0.5)
    with fetch.cond:
        stale = [t for t, p, _ in fetch.msgs if old_hash in t and p]
    assert stale == []

    dev.send(dev.update(g, np.zeros_like(g.weights), 4).encode())
    assert agg.wait() == 0


def test_sigterm_stops_cleanly_and_bad_usage_exits_2(any_broker, boston_bundle, tmp_path, agg_factory):
    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(1, 1, 1, 30))
    agg_factory.peer(any_broker.url, "dev-a").global_model(1)
    agg.proc.send_signal(signal.SIGTERM)
    assert agg.wait(20) == 143
    assert "event=aggregator_stopped" in agg.text()

    bad = agg_factory.agg(any_broker.url, boston_bundle, tmp_path / "s2", *common(1, 3, 2, 30))
    assert bad.wait(30) == 2
    assert bad.text().strip().splitlines()[-1] == "fleetlearn aggregator: error: --target-devices 2 is below --min-devices 3"
    other = agg_factory.agg(any_broker.url, tmp_path / "nope", tmp_path / "s3", *common(1, 1))
    assert other.wait(30) == 2 and "nope" in other.text()


def test_model_option_exports_into_the_state_dir(mosquitto, tmp_path, agg_factory):
    """--model NAME instead of --bundle: the aggregator exports on start (once), then runs."""
    state = tmp_path / "state"
    agg = agg_factory.agg(mosquitto.url, None, state, "--model", "boston-mlp", *common(1, 1, 1, 30))
    dev = agg_factory.peer(mosquitto.url, "dev-a")
    g = dev.global_model(1, timeout=90)
    manifest = load_bundle(state / "bundle")
    assert g.model_hash == manifest.model_hash and g.weights.size == manifest.num_params
    dev.send(dev.update(g, np.zeros_like(g.weights), 3).encode())
    assert agg.wait(60) == 0, agg.text()[-3000:]
    assert "event=bundle_export" in agg.text() and (state / "model.onnx").exists()


def test_broker_restart_mid_round_republishes_retained_state(any_broker, boston_bundle, tmp_path, agg_factory):
    """A restarted broker has lost every retained message: the aggregator reconnects and
    publishes the bundle, the global model and the round state again."""
    state = tmp_path / "state"
    agg = agg_factory.agg(any_broker.url, boston_bundle, state, *common(1, 1, 1, 60))
    first = agg_factory.peer(any_broker.url, "dev-a")
    g = first.global_model(1)
    any_broker.restart(down_s=0.5)
    wait_until(lambda: "event=republish_retained" in agg.text(), timeout=40)
    late = agg_factory.peer(any_broker.url, "dev-b", subscribe=(T.bundle,))
    again = late.global_model(1)
    assert again.run_id == g.run_id and again.weights.tobytes() == g.weights.tobytes()
    assert late.round_state(1, "open").run_id == g.run_id
    assert late.wait(lambda t, p: t == T.bundle and BundleAnnouncement.decode(p).model_hash == g.model_hash)
    u = late.update(again, np.zeros_like(again.weights), 8)
    late.send(u.encode())
    assert late.ack(u.nonce).accepted
    assert agg.wait() == 0, agg.text()[-3000:]


def test_python_api_in_process_with_the_embedded_broker(boston_bundle, tmp_path):
    """What `fleetlearn demo` can do without subprocesses: EmbeddedBroker + Aggregator in threads."""
    from fleetlearn.aggregator import Aggregator, AggregatorConfig, EmbeddedBroker, RoundPolicy

    events: list[tuple[str, dict]] = []
    with EmbeddedBroker("127.0.0.1", 0) as broker:
        cfg = AggregatorConfig(
            broker=broker.url,
            state_dir=tmp_path / "state",
            bundle=boston_bundle,
            rounds=RoundPolicy(rounds=2, min_devices=1, deadline=20),
            fleet=FLEET,
        )
        agg = Aggregator(cfg, on_event=lambda name, fields: events.append((name, fields)))
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(agg.run()))
        thread.start()
        dev = Peer(broker.url, "dev-a")
        try:
            for rnd in (1, 2):
                g = dev.global_model(rnd)
                dev.send(dev.update(g, np.full(g.weights.size, 0.01, np.float32), 5).encode())
            thread.join(30)
        finally:
            agg.stop()
            thread.join(10)
            dev.close()
    assert result == [0]
    names = [n for n, _ in events]
    assert names.count("round_closed") == 2 and names[-1] == "finished"
    closed = [f for n, f in events if n == "round_closed"]
    assert [f["round"] for f in closed] == [1, 2] and closed[0]["devices"] == ["dev-a"]


def test_stop_from_another_thread_while_waiting(boston_bundle, tmp_path):
    from fleetlearn.aggregator import AggregatorConfig, EmbeddedBroker, RoundPolicy
    from fleetlearn.aggregator.engine import Aggregator

    with EmbeddedBroker("127.0.0.1", 0) as broker:
        agg = Aggregator(
            AggregatorConfig(
                broker=broker.url,
                state_dir=tmp_path / "s",
                bundle=boston_bundle,
                rounds=RoundPolicy(rounds=1, min_devices=1, deadline=60),
            )
        )
        threading.Timer(2.0, agg.stop).start()
        t0 = time.monotonic()
        assert agg.run() == 143 and time.monotonic() - t0 < 10


def test_an_overflowing_model_fails_the_round_and_emits_round_failed(boston_bundle, tmp_path):
    """Finite updates whose server step overflows float32 (fedavgm at --server-lr 10): the round
    fails (exit 3), and the failure is logged, published and handed to on_event alike."""
    from fleetlearn.aggregator import Aggregator, AggregatorConfig, EmbeddedBroker, RoundPolicy, StrategyChoice

    events: list[tuple[str, dict]] = []
    with EmbeddedBroker("127.0.0.1", 0) as broker:
        cfg = AggregatorConfig(
            broker=broker.url,
            state_dir=tmp_path / "state",
            bundle=boston_bundle,
            fleet=FLEET,
            rounds=RoundPolicy(rounds=2, min_devices=1, deadline=20),
            strategy=StrategyChoice("fedavgm", {"server_lr": 10.0}),
        )
        agg = Aggregator(cfg, on_event=lambda name, fields: events.append((name, fields)))
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(agg.run()))
        thread.start()
        dev = Peer(broker.url, "dev-a")
        try:
            g = dev.global_model(1)
            dev.send(dev.update(g, np.full(g.weights.size, 1e38, np.float32), 5).encode())
            failed = dev.round_state(1, "failed")
            thread.join(30)
        finally:
            agg.stop()
            thread.join(10)
            dev.close()
    assert result == [3] and "NaN/Inf" in agg.exit_reason and "NaN/Inf" in failed.reason
    (fields,) = [f for n, f in events if n == "round_failed"]
    assert fields["round"] == 1 and fields["reason"] == agg.exit_reason
    assert "round_closed" not in [n for n, _ in events]
    assert not (tmp_path / "state" / "global" / "round_0001.f32").exists()  # never committed

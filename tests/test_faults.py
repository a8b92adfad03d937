"""Fault injection with real processes on a real mosquitto: SIGKILL the aggregator mid-round,
SIGKILL a device mid-training, take the broker away mid-round. No mocks: the aggregator and
the devices are `fleetlearn aggregator` / `fleetlearn device` subprocesses; the test only
watches the wire (a recording MQTT client) and the state dirs, and injects the fault.

docs/security-faults.md says which mechanism each test proves and what it does not cover.
The helpers here are shared with tests/test_faults_hostile.py.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Status, Topics, Update
from tests.conftest import stop_process
from tests.peers import Recorder
from tests.procs import AggregatorProcess, FleetlearnProcess

# A slow device's training: many local steps (~0.07 ms each for the Boston MLP on one core),
# so a test can act while it trains. Generous on purpose; a busy CI box only makes it slower.
SLOW_STEPS = 60_000


# ------------------------------------------------------------------------------- helpers


class AggProc(AggregatorProcess):
    def __init__(self, tmp: Path, url: str, fleet: str, bundle: Path, state: Path, *args: str, name: str = "agg"):
        super().__init__(tmp, url, fleet, state, *args, bundle=bundle, name=name)


def agg_args(rounds: int, min_devices: int, target: int, deadline: float, *more: str) -> list[str]:
    return [
        "--rounds",
        str(rounds),
        "--min-devices",
        str(min_devices),
        "--target-devices",
        str(target),
        "--deadline",
        str(deadline),
        *more,
    ]


def device_config(tmp: Path, url: str, fleet: str, bundle: Path, data: Path, device_id: str, **training) -> Path:
    """A device TOML; the state dir is tmp/<device_id>-state (a rewrite keeps it)."""
    cfg = tmp / f"{device_id}.toml"
    t = {"batch_size": 8, "local_epochs": 1, "threads": 1, **training}
    cfg.write_text(
        f'device_id = "{device_id}"\nfleet = "{fleet}"\nbroker = "{url}"\nbundle = "{bundle}"\n'
        f'data = "{data}"\nstate_dir = "{tmp / (device_id + "-state")}"\n\n[training]\n'
        + "".join(f"{k} = {v}\n" for k, v in t.items())
    )
    return cfg


class DevProc(FleetlearnProcess):
    """`fleetlearn device --config CFG EXTRA...`."""

    what = "device"

    def __init__(self, cfg: Path, log: Path, *extra: str):
        super().__init__(log, "device", "--config", str(cfg), *extra)


def wait_text(read: Callable[[], str], needle: str | re.Pattern, timeout: float = 30.0, what: str = "log") -> str:
    end = time.monotonic() + timeout
    while True:
        text = read()
        if needle.search(text) if isinstance(needle, re.Pattern) else needle in text:
            return text
        if time.monotonic() > end:
            raise AssertionError(f"{needle!r} not in {what} after {timeout}s:\n{text[-3000:]}")
        time.sleep(0.05)


def agg_events(text: str, event: str) -> list[str]:
    """The aggregator log lines of one event (anchored on the logger, so a reason that quotes
    `event=...` cannot be counted)."""
    marker = f" logger=fleetlearn.aggregator event={event} "
    return [line for line in text.splitlines() if marker in line + " "]


def rounds_log(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]


def state_weights(state: Path, rnd: int) -> np.ndarray:
    return np.fromfile(state / "global" / f"round_{rnd:04d}.f32", dtype="<f4")


def fedavg(w: np.ndarray, updates: list[Update]) -> np.ndarray:
    """numpy's w + sum(n_i d_i) / sum(n_i), in float64."""
    total = sum(u.samples for u in updates)
    return w.astype(np.float64) + sum(u.samples * u.delta.astype(np.float64) for u in updates) / total


def updates_on_the_wire(rec: Recorder, T: Topics, num_params: int) -> dict[str, list[bytes]]:
    """nonce -> every payload seen on update/+ with that nonce."""
    out: dict[str, list[bytes]] = {}
    for topic, payload, _ in rec.snapshot():
        if topic.startswith(T.base + "/update/"):
            out.setdefault(Update.decode(payload, num_params).nonce, []).append(payload)
    return out


@pytest.fixture
def procs():
    """Everything a test starts; killed at the end whatever happened."""
    started: list = []
    yield started
    for p in started:
        if isinstance(p, (AggProc, DevProc)):
            stop_process(p.proc, timeout=5)
        elif isinstance(p, Recorder):
            p.close()


# ------------------------------------------------------------------------------- tests


def test_aggregator_sigkill_mid_round_loses_nothing_and_counts_nothing_twice(
    mosquitto, tmp_path, boston_bundle, boston_shards, procs
):
    """3 real devices, target 3; one trains slowly. The aggregator is SIGKILLed after it acked
    at least one update of round 1 and before the round closed, and restarted on the same
    state dir once the slow device has sent its update to nobody. Round 1 must close with
    exactly the three devices' deltas, each counted once."""
    shards, _ = boston_shards
    fleet = "fault-aggkill"
    T = Topics(fleet)
    n_params = load_bundle(boston_bundle).num_params
    state = tmp_path / "agg-state"
    wire = Recorder(mosquitto.url, [T.all_updates, T.ack("+")], "wire")
    procs.append(wire)
    args = agg_args(1, 3, 3, 60)
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg1")
    procs.append(agg)
    names = ["dev-a", "dev-b", "dev-slow"]
    devs = {}
    for name, shard in zip(names, shards):
        slow = dict(local_epochs=100_000, max_steps=SLOW_STEPS) if name == "dev-slow" else {}
        cfg = device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shard, name, **slow)
        devs[name] = DevProc(cfg, tmp_path / f"{name}.log", "--max-rounds", "1")
        procs.append(devs[name])

    wait_text(agg.text, "event=update_accepted", 60, "aggregator log")
    agg.kill9()
    first = agg.text()
    assert "event=round_closed" not in first, "the round closed before the kill: the slow device was not slow"
    assert "event=update_sent" not in devs["dev-slow"].text(), "the slow device finished before the kill"
    acked_before = {re.search(r"device=(\S+)", line).group(1) for line in agg_events(first, "update_accepted")}
    # Stay dead until the slow device has sent its update: it reaches the restarted aggregator
    # through the broker's queue for the aggregator's persistent session, and again (same
    # nonce) when the device sees the round re-announced: it must count once.
    wait_text(devs["dev-slow"].text, "event=update_sent", 90, "dev-slow log")

    agg2 = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg2")
    procs.append(agg2)
    assert agg2.wait(90) == 0, agg2.text()[-3000:]
    for name, dev in devs.items():
        assert dev.wait(60) == 0, f"{name}:\n{dev.text()[-3000:]}"
    second = agg2.text()
    (resumed,) = agg_events(second, "round_resumed")
    # The restarted aggregator knows every update the first one acked (persisted before the ack).
    assert " round=1 " in resumed and acked_before <= set(re.search(r" devices=(\S+)", resumed).group(1).split(","))

    # What the devices put on the wire, deduplicated by nonce: one update per device.
    seen = updates_on_the_wire(wire, T, n_params)
    for nonce, payloads in seen.items():
        assert len(set(payloads)) == 1, "a re-send must be the same bytes"
    updates = [Update.decode(p[0], n_params) for p in seen.values()]
    assert sorted(u.device_id for u in updates) == names, "a device trained twice or never"

    w0 = state_weights(state, 0)
    want = fedavg(w0, updates)
    got = state_weights(state, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    final = Recorder(mosquitto.url, [T.global_model], "final")
    procs.append(final)
    g = final.wait(lambda t, p: (x := GlobalModel.decode(p)).round == 2 and x)
    assert not g.train and g.weights.tobytes() == got.tobytes()

    (rec,) = rounds_log(state)
    assert rec["round"] == 1 and rec["devices"] == names and rec["accepted"] == 3
    assert rec["samples"] == sum(u.samples for u in updates)
    # The log never claims an update twice, and never one a crash lost: update_accepted is
    # written when the ack goes out, after the update is durable. An update made durable just
    # before the kill, whose ack never went out, is not claimed by the first aggregator; the
    # second restores it from the partial round (round_resumed lists it) and acks the re-send
    # as a duplicate of a counted update.
    accepted = [
        re.search(r"device=(\S+)", line).group(1)
        for line in agg_events(first, "update_accepted") + agg_events(second, "update_accepted")
    ]
    assert len(accepted) == len(set(accepted)), accepted
    restored = set(re.search(r" devices=(\S+)", resumed).group(1).split(","))
    assert set(accepted) | restored == set(names), (accepted, restored)
    # No nonce was refused, and every nonce was acknowledged as accepted, except possibly a
    # restored one: when the restarted aggregator reaches its target with the restored updates
    # and the queued one, the round closes before that device's re-send arrives; the device is
    # then told by the next global model that the round closed, and its update is in the record.
    acks = [Ack.decode(p) for t, p, _ in wire.snapshot() if t.startswith(T.base + "/ack/")]
    assert not [a for a in acks if not a.accepted]
    unacked = set(seen) - {a.nonce for a in acks if a.accepted}
    assert {u.device_id for u in updates if u.nonce in unacked} <= restored - set(accepted), unacked


def test_device_sigkill_mid_training_round_closes_without_it_and_it_rejoins(
    mosquitto, tmp_path, boston_bundle, boston_shards, procs
):
    """min 2, target 3: a device killed while training costs its round (closed at the
    deadline with the other two); restarted from its state dir it joins the next round."""
    shards, _ = boston_shards
    fleet = "fault-devkill"
    T = Topics(fleet)
    state = tmp_path / "agg-state"
    watch = Recorder(mosquitto.url, [T.all_status], "status")
    procs.append(watch)
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *agg_args(2, 2, 3, 10))
    procs.append(agg)
    devs = {}
    for name, shard in zip(("dev-a", "dev-b"), shards):
        devs[name] = DevProc(
            device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shard, name),
            tmp_path / f"{name}.log",
            "--max-rounds",
            "2",
        )
        procs.append(devs[name])
    # Hours of training: it will not finish on its own.
    slow_cfg = device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shards[2], "dev-c", local_epochs=1_000_000)
    victim = DevProc(slow_cfg, tmp_path / "dev-c-1.log")
    procs.append(victim)

    watch.wait(lambda t, p: t == T.status("dev-c") and (s := Status.decode(p)).state == "training" and s.round == 1, timeout=60)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    # The broker tells the fleet (Last Will); the state dir holds no half-written update.
    watch.wait(lambda t, p: t == T.status("dev-c") and Status.decode(p).state == "offline", timeout=60)
    c_state = tmp_path / "dev-c-state"
    assert not (c_state / "pending_update.bin").exists()

    wait_text(agg.text, "event=round_closed round=1", 60, "aggregator log")
    # Same state dir, a config that trains in milliseconds this time.
    fast_cfg = device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shards[2], "dev-c")
    again = DevProc(fast_cfg, tmp_path / "dev-c-2.log", "--max-rounds", "1")
    procs.append(again)

    assert agg.wait(90) == 0, agg.text()[-3000:]
    for name, dev in [*devs.items(), ("dev-c", again)]:
        assert dev.wait(60) == 0, f"{name}:\n{dev.text()[-3000:]}"
    r1, r2 = rounds_log(state)
    assert r1["round"] == 1 and r1["devices"] == ["dev-a", "dev-b"] and r1["closed_by"] == "deadline"
    assert r2["round"] == 2 and r2["devices"] == ["dev-a", "dev-b", "dev-c"] and r2["closed_by"] == "target"
    text = again.text()
    assert "event=update_sent device=dev-c round=2" in text and "event=update_sent device=dev-c round=1" not in text
    dev_state = json.loads((c_state / "device_state.json").read_text())
    assert dev_state["last_round"] == 2 and dev_state["pending_round"] == 0


def test_broker_restart_mid_round_everyone_reconnects_and_the_run_finishes(
    mosquitto, tmp_path, boston_bundle, boston_shards, procs
):
    """The broker goes away twice (persistence off: every retained message and session is
    lost). First while a device trains round 2, and it stays away until that device has
    finished and 'sent' its update into the void; then a plain restart during round 3.
    Everyone reconnects on their own, the aggregator republishes its retained state, the
    device re-sends its pending update, and all rounds close with every device."""
    shards, _ = boston_shards
    fleet = "fault-broker"
    T = Topics(fleet)
    state = tmp_path / "agg-state"
    watch = Recorder(mosquitto.url, [T.all_status], "status")
    procs.append(watch)
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *agg_args(3, 3, 3, 90))
    procs.append(agg)
    names = ["dev-a", "dev-b", "dev-slow"]
    devs = {}
    for name, shard in zip(names, shards):
        slow = dict(local_epochs=100_000, max_steps=SLOW_STEPS // 2) if name == "dev-slow" else {}
        devs[name] = DevProc(
            device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shard, name, **slow),
            tmp_path / f"{name}.log",
            "--max-rounds",
            "3",
        )
        procs.append(devs[name])
    slow = devs["dev-slow"]

    def training(rnd: int) -> Callable[[str, bytes], bool]:
        return lambda t, p: t == T.status("dev-slow") and (s := Status.decode(p)).state == "training" and s.round == rnd

    # Fault 1: the broker dies while dev-slow trains round 2 and stays dead until its update is sent.
    watch.wait(training(2), timeout=90)
    mosquitto.stop()
    wait_text(slow.text, "event=update_sent device=dev-slow round=2", 60, "dev-slow log")
    assert not re.search(r"event=update_accepted device=dev-slow round=2\b", agg.text()), (
        "precondition: the update got through before the broker died"
    )
    time.sleep(0.5)
    mosquitto.start()
    wait_text(agg.text, "event=update_accepted device=dev-slow round=2", 60, "aggregator log")
    # Fault 2: a plain restart while dev-slow trains round 3.
    watch.wait(training(3), timeout=60)
    mosquitto.restart(down_s=1.0)

    assert agg.wait(120) == 0, agg.text()[-3000:]
    for name, dev in devs.items():
        assert dev.wait(60) == 0, f"{name}:\n{dev.text()[-3000:]}"
    log = rounds_log(state)
    assert [r["round"] for r in log] == [1, 2, 3]
    assert all(r["devices"] == names for r in log), [r["devices"] for r in log]
    text = agg.text()
    assert len(agg_events(text, "republish_retained")) >= 2
    assert len(agg_events(text, "update_accepted")) == 9  # each device once per round
    assert re.search(r"event=update_resent device=dev-slow round=2\b", slow.text()), "the pending update was never re-sent"
    assert "Traceback" not in text and "handler_failed" not in text
    # The retained final model survived the second restart (republished or published after it).
    final = Recorder(mosquitto.url, [T.global_model], "final")
    procs.append(final)
    g = final.wait(lambda t, p: (x := GlobalModel.decode(p)).round == 4 and x)
    assert not g.train and g.weights.tobytes() == state_weights(state, 3).tobytes()

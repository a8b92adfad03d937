"""SIGKILL during background group commits: nothing acknowledged is lost.

The aggregator folds updates in on its engine thread while a writer thread persists the
round's partial state, and acks a group only once its write finished (aggregator/intake.py).
Here a burst of real UPDATE frames meets a real `fleetlearn aggregator` on mosquitto, the
aggregator is SIGKILLed once acks are flowing, and the state dir it leaves must hold every
update the wire saw acknowledged, with a running sum made of exactly the updates it lists.
"""

from __future__ import annotations

import secrets
import time

import numpy as np

from fleetlearn.aggregator.model_store import decode_partial
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Topics, Update
from tests.peers import Recorder
from tests.test_faults import AggProc, agg_args, agg_events, procs, wait_text  # noqa: F401 (procs: fixture)

BURST = 1500  # updates: the kill lands while the engine is still folding them in


def acks_on_the_wire(rec: Recorder, T: Topics) -> list[Ack]:
    return [Ack.decode(p) for t, p, _ in rec.snapshot() if t.startswith(T.base + "/ack/")]


def test_sigkill_during_group_commits_keeps_every_acked_update(mosquitto, tmp_path, boston_bundle, procs):  # noqa: F811
    fleet = "fault-groupcommit"
    T = Topics(fleet)
    m = load_bundle(boston_bundle)
    state = tmp_path / "agg-state"
    wire = Recorder(mosquitto.url, [T.global_model, T.ack("+")], "wire")
    procs.append(wire)
    args = agg_args(1, BURST + 1, BURST + 1, 600)  # the round stays open: only group commits persist
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg1")
    procs.append(agg)
    g = wire.wait(lambda t, p: t == T.global_model and (x := GlobalModel.decode(p, m.num_params)).round == 1 and x, 60)

    rng = np.random.default_rng(7)
    updates = {
        f"dev-{i:04d}": Update(
            g.run_id,
            1,
            f"dev-{i:04d}",
            m.model_hash,
            int(rng.integers(1, 500)),
            1.0,
            0.01,
            secrets.token_hex(16),
            rng.normal(0, 1e-3, m.num_params).astype(np.float32),
        )
        for i in range(BURST)
    }
    frames = {d: u.encode() for d, u in updates.items()}
    for d, frame in frames.items():
        wire.client.publish(T.update(d), frame, qos=1)

    # Killed the moment the first ack arrives: an ack sent before its group's write finished
    # (5-50 ms of fsync here) would name an update the state dir does not hold.
    wire.wait(lambda t, p: t.startswith(T.base + "/ack/") and Ack.decode(p).accepted, 120)
    agg.kill9()
    time.sleep(1.0)  # acks the aggregator published before it died may still be on their way
    acks = acks_on_the_wire(wire, T)
    assert acks and all(a.accepted for a in acks), [a.reason for a in acks if not a.accepted][:5]
    acked = {(a.device_id, a.nonce) for a in acks}

    # The partial round on disk holds every acknowledged update...
    path = state / "partial_round.bin"
    assert path.exists(), f"{len(acked)} updates acked, no partial round on disk"
    partial = decode_partial(path.read_bytes())
    assert partial.round == 1 and partial.run_id == g.run_id
    assert acked <= set(partial.accepted.items()), sorted(acked - set(partial.accepted.items()))[:5]
    # ...and a running sum of exactly the updates it lists (a consistent snapshot, not a sum
    # that already holds updates folded in after the snapshot's accepted list was taken).
    listed = [updates[d] for d in partial.accepted]
    assert all(updates[d].nonce == n for d, n in partial.accepted.items())
    want = np.zeros(m.num_params, np.float64)
    for u in listed:
        want += u.delta.astype(np.float64) * u.samples
    np.testing.assert_allclose(partial.strategy["sum"], want, rtol=1e-12, atol=1e-15)
    assert partial.strategy["total_samples"] == sum(u.samples for u in listed)
    assert partial.strategy["accepted"] == len(listed)
    # The log claims no update the disk does not hold (update_accepted follows the write).
    logged = {line.split("device=")[1].split()[0] for line in agg_events(agg.text(), "update_accepted")}
    assert logged <= set(partial.accepted)

    # A restarted aggregator resumes the round with them and acks a re-send as counted once.
    agg2 = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg2")
    procs.append(agg2)
    text = wait_text(agg2.text, "event=round_resumed", 60, "aggregator log")
    (resumed,) = agg_events(text, "round_resumed")
    assert f"accepted={len(partial.accepted)} " in resumed + " "
    device, nonce = sorted(acked)[0]
    wire.client.publish(T.update(device), frames[device], qos=1)
    end = time.monotonic() + 60
    while True:
        again = [a for a in acks_on_the_wire(wire, T)[len(acks) :] if a.device_id == device]
        if again:
            break
        assert time.monotonic() < end, agg2.text()[-3000:]
        time.sleep(0.05)
    assert again[0].accepted and again[0].nonce == nonce and "counted once" in again[0].reason


def test_a_burst_larger_than_the_ack_window_gets_every_ack(mosquitto, tmp_path, boston_bundle, procs):  # noqa: F811
    """Past intake.ACK_WINDOW acks awaiting their PUBACK, durable acks wait in the aggregator
    (not in paho's queue); none may stay there. Round 1: every ack arrives while the aggregator
    waits for round 2 (handed out as the engine loop turns). Round 2, the last: every ack
    arrives too (handed out before the run's last flush)."""
    from fleetlearn.aggregator.intake import ACK_WINDOW

    burst = 8 * ACK_WINDOW  # a round's close alone (the acks since the last partial write) exceeds the window
    fleet = "fault-ackwindow"
    T = Topics(fleet)
    m = load_bundle(boston_bundle)
    wire = Recorder(mosquitto.url, [T.global_model, T.ack("+")], "wire")
    procs.append(wire)
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, tmp_path / "agg-state", *agg_args(2, burst, burst, 600))
    procs.append(agg)
    rng = np.random.default_rng(11)
    sent: dict[tuple[str, str], int] = {}
    for rnd in (1, 2):
        g = wire.wait(lambda t, p: t == T.global_model and (x := GlobalModel.decode(p, m.num_params)).round == rnd and x, 60)
        for i in range(burst):
            d, nonce = f"dev-{i:04d}", secrets.token_hex(16)
            delta = rng.normal(0, 1e-3, m.num_params).astype(np.float32)
            wire.client.publish(T.update(d), Update(g.run_id, rnd, d, m.model_hash, 10, 1.0, 0.01, nonce, delta).encode(), qos=1)
            sent[(d, nonce)] = rnd
        end = time.monotonic() + 60
        while len(acks := acks_on_the_wire(wire, T)) < len(sent) and time.monotonic() < end:
            time.sleep(0.1)
        assert len(acks) == len(sent), f"round {rnd}: {len(acks)} acks for {len(sent)} updates"
        if rnd == 1:
            assert agg.proc.poll() is None, "round 2 is open: the aggregator must still run"
    assert agg.wait(120) == 0, agg.text()[-3000:]
    assert all(a.accepted for a in acks), [a.reason for a in acks if not a.accepted][:5]
    assert sorted((a.device_id, a.nonce) for a in acks) == sorted(sent), f"{len(acks)} acks for {len(sent)} updates"
    assert len(agg_events(agg.text(), "update_accepted")) == len(sent)

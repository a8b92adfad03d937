"""The round commit off the critical path, under a real SIGKILL (aggregator/commit_writer.py).

The aggregator publishes round r+1's global model before round r's commit is durable. A kill in
that window must cost only a retrain: on restart the aggregator resumes from its last durable
round, the devices see the round go back and train it again, no acknowledged update is lost and
none is counted twice. To kill inside the window every time (it lasts milliseconds), the first
aggregator runs with the writer's test hook FLEETLEARN_TEST_COMMIT_DELAY_S, which makes the
commit thread wait before each commit: a real delay in the real writer, nothing else changes.
Real processes on a real mosquitto; the test watches the wire and the state dir.
"""

from __future__ import annotations

import json
import re

import numpy as np

from fleetlearn.aggregator.commit_writer import DELAY_ENV
from fleetlearn.aggregator.model_store import ModelStore, PartialRound
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, Topics, Update
from tests.peers import Recorder
from tests.test_faults import AggProc, DevProc, agg_args, device_config, procs, rounds_log, state_weights, wait_text  # noqa: F401

ROUNDS = 3


def _acked(rec: Recorder, T: Topics) -> list[Ack]:
    return [a for t, p, _ in rec.snapshot() if t.startswith(T.base + "/ack/") and (a := Ack.decode(p)).accepted]


def test_sigkill_between_the_next_global_model_and_the_durable_commit_costs_a_retrain(
    mosquitto, tmp_path, boston_bundle, boston_shards, procs, monkeypatch
):
    shards, _ = boston_shards
    fleet = "fault-commit"
    T = Topics(fleet)
    n = load_bundle(boston_bundle).num_params
    state = tmp_path / "agg-state"
    wire = Recorder(mosquitto.url, [T.all_updates, T.ack("+")], "wire")
    procs.append(wire)
    args = agg_args(ROUNDS, 2, 2, 60)
    monkeypatch.setenv(DELAY_ENV, "10")  # inherited by the first aggregator only
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg1")
    procs.append(agg)
    monkeypatch.delenv(DELAY_ENV)
    devs = {}
    for name, shard in zip(["dev-a", "dev-b"], shards):
        cfg = device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shard, name)
        devs[name] = DevProc(cfg, tmp_path / f"{name}.log")  # no --max-rounds: they outlive the first aggregator
        procs.append(devs[name])

    # Round 1 closed, round 2's global model is out, both devices trained round 2 and sent it:
    # all while round 1's commit waits in the writer.
    wait_text(agg.text, "event=round_open round=2 ", 60, "aggregator log")
    for name, dev in devs.items():
        wait_text(dev.text, re.compile(rf"event=update_sent device={name} round=2 "), 30, f"{name} log")
    before = json.loads((state / "state.json").read_text())
    agg.kill9()
    assert before["round"] == 0, "round 1's commit was durable before the kill: the window was missed"
    assert not (state / "rounds.jsonl").exists() or not (state / "rounds.jsonl").read_text().strip()
    first = agg.text()
    assert "event=round_closed" not in first  # logged only once the commit is durable
    acked_before = _acked(wire, T)
    assert all(a.round == 1 for a in acked_before), "an update of round 2 was acknowledged before round 1 was durable"
    lost = {
        Update.decode(p, n).nonce
        for t, p, _ in wire.snapshot()
        if t.startswith(T.base + "/update/") and Update.decode(p, n).round == 2
    }
    assert len(lost) == 2, "both devices sent a round-2 update on the lost round 1"

    agg2 = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *args, name="agg2")
    procs.append(agg2)
    assert agg2.wait(120) == 0, agg2.text()[-3000:]
    second = agg2.text()
    assert "resumed_after=0" in second
    for name, dev in devs.items():
        assert f"event=round_went_back device={name} round=1 " in dev.text(), dev.text()[-3000:]

    # Every acknowledged update is in its round's weights, once; each device once per round;
    # the round-2 updates trained on the lost round 1 were never acknowledged, nor counted. An
    # update the first aggregator made durable in round 1's partial is counted too, acked or not
    # (the kill may come before its ack; the device then trains round 1 again, and that second
    # update is refused: the restored one already counts).
    sent = [Update.decode(p, n) for t, p, _ in wire.snapshot() if t.startswith(T.base + "/update/")]
    updates = {u.nonce: u for u in sent}
    acked = _acked(wire, T)
    assert {a.nonce for a in acked_before} <= {a.nonce for a in acked}
    assert not lost & {a.nonce for a in acked}
    # Round 1's partial may never have been written: when both round-1 updates reached the writer
    # before its first partial did, the round's commit superseded that partial, and the kill came
    # in the commit's delay. Then the restart opens round 1 afresh (no round_resumed line), and
    # nothing of round 1 was acknowledged before the kill.
    resumed_lines = [line for line in second.splitlines() if " event=round_resumed " in line]
    assert len(resumed_lines) <= 1, resumed_lines
    resumed = resumed_lines[0] if resumed_lines else ""
    if not resumed:
        assert not acked_before, "round 1 was acknowledged, yet the restart found no durable partial"
    restored = set(re.search(r" devices=(\S+)", resumed).group(1).split(",")) if " round=1 " in resumed else set()
    first_of = {}
    for u in sent:
        first_of.setdefault((u.device_id, u.round), u)  # before the kill: the update the partial holds
    records = rounds_log(state)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)) and len({r["run_id"] for r in records}) == 1
    for rnd in range(1, ROUNDS + 1):
        counted = {a.nonce: updates[a.nonce] for a in acked if a.round == rnd}
        if rnd == 1:
            counted.update({first_of[(d, 1)].nonce: first_of[(d, 1)] for d in restored})
        assert sorted(u.device_id for u in counted.values()) == ["dev-a", "dev-b"], (rnd, restored, counted.keys())
        assert records[rnd - 1]["devices"] == ["dev-a", "dev-b"] and records[rnd - 1]["accepted"] == 2
        us = list(counted.values())
        total = sum(u.samples for u in us)
        want = state_weights(state, rnd - 1).astype(np.float64) + sum(u.samples * u.delta.astype(np.float64) for u in us) / total
        np.testing.assert_allclose(state_weights(state, rnd), want, rtol=1e-6, atol=1e-7)


def test_a_partial_of_a_round_after_the_open_one_is_dropped_on_restart(tmp_path):
    """Written while the round before it was still being committed, when that commit never
    became durable: nothing in it was acknowledged, and it was trained on lost weights."""
    n = 4
    store = ModelStore.open(tmp_path, "a" * 64, n, lambda: np.zeros(n, np.float32))
    store.save_partial(PartialRound(store.run_id, 2, {"dev-a": "1" * 32}, {"sum": np.ones(n), "total_samples": 3}))
    again = ModelStore.open(tmp_path, "a" * 64, n, lambda: np.zeros(n, np.float32))
    assert again.round == 0 and again.load_partial(None) is None
    # A partial of the open round survives (its acks went out).
    again.save_partial(PartialRound(store.run_id, 1, {"dev-a": "1" * 32}, {"sum": np.ones(n), "total_samples": 3}))
    third = ModelStore.open(tmp_path, "a" * 64, n, lambda: np.zeros(n, np.float32))
    assert third.load_partial(1) is not None

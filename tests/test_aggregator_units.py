"""The aggregator's pieces without a broker: FedAvg math, validation order, durable state,
bundle chunking (checked with the device's own assembler). Real frames, real files."""

from __future__ import annotations

import json
import secrets
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.aggregator.distribution import chunk_messages, clear_messages, plan_bundle
from fleetlearn.aggregator.fedavg import FedAvg, apply_mean_delta, new_accumulator, weighted_sum_update
from fleetlearn.aggregator.model_store import ModelStore, PartialRound, StateError, decode_partial, encode_partial
from fleetlearn.aggregator.partial_round import AcceptedJson, accepted_json
from fleetlearn.aggregator.registry import make_strategy
from fleetlearn.aggregator.round_log import append_round_record, read_round_log
from fleetlearn.aggregator.validation import Rejection, max_update_bytes, validate_update
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import BundleAnnouncement, RoundMetrics, Topics, Update
from fleetlearn.edge_runtime.device.bundle_fetch import BundleAssembly

N = 7
HASH = "ab" * 32
T = Topics("unit")


def make_update(store, device="dev-a", samples=10, delta=None, nonce=None, rnd=None, **kw) -> Update:
    fields = dict(
        run_id=store.run_id,
        round=store.open_round if rnd is None else rnd,
        device_id=device,
        model_hash=store.model_hash,
        samples=samples,
        train_loss=1.5,
        train_s=0.1,
        nonce=nonce or secrets.token_hex(16),
        delta=np.full(N, 0.5, np.float32) if delta is None else delta,
    )
    fields.update(kw)
    return Update(**fields)


@pytest.fixture
def store(tmp_path):
    return ModelStore.open(tmp_path / "state", HASH, N, lambda: np.arange(N, dtype=np.float32))


# ------------------------------------------------------------------ FedAvg


def test_fedavg_pure_functions_match_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=N).astype(np.float32)
    deltas = [rng.normal(size=N).astype(np.float32) for _ in range(3)]
    ns = [3, 50, 7]
    acc = new_accumulator(N)
    for d, n in zip(deltas, ns):
        weighted_sum_update(acc, d, n)
    got = apply_mean_delta(w, acc, sum(ns))
    want = w.astype(np.float64) + sum(n * d.astype(np.float64) for d, n in zip(deltas, ns)) / sum(ns)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError):
        apply_mean_delta(w, new_accumulator(N), 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10_000), st.floats(-100, 100, allow_nan=False, width=32)), min_size=1, max_size=12))
def test_streaming_fedavg_equals_the_batch_weighted_mean(updates):
    """Folding updates one at a time gives the weighted mean of the local models."""
    w = np.linspace(-1, 1, N, dtype=np.float32)
    strat = FedAvg()
    strat.begin_round(1, w)
    store = type("V", (), {"run_id": "0" * 32, "model_hash": HASH, "open_round": 1})()
    for i, (n, v) in enumerate(updates):
        strat.accumulate(make_update(store, device=f"d{i}", samples=n, delta=np.full(N, v, np.float32)))
    local = [w.astype(np.float64) + np.float32(v) for _, v in updates]
    ns = np.array([n for n, _ in updates], dtype=np.float64)
    want = sum(n * m for n, m in zip(ns, local)) / ns.sum()
    np.testing.assert_allclose(strat.step(w, strat.aggregate()), want, rtol=1e-6, atol=1e-5)
    assert strat.round_summary()["samples"] == int(ns.sum())


def test_fedavg_state_dict_round_trip_is_bit_identical(store):
    rng = np.random.default_rng(1)
    a, b = FedAvg(), FedAvg()
    w = rng.normal(size=N).astype(np.float32)
    a.begin_round(1, w)
    a.accumulate(make_update(store, samples=13, delta=rng.normal(size=N).astype(np.float32)))
    raw = encode_partial(PartialRound(store.run_id, 1, {"dev-a": "1" * 32}, a.partial_state()))
    b.begin_round(1, w)
    b.load_partial_state(decode_partial(raw).strategy)
    u = make_update(store, device="dev-b", samples=5, delta=rng.normal(size=N).astype(np.float32))
    a.accumulate(u)
    b.accumulate(u)
    assert a.step(w, a.aggregate()).tobytes() == b.step(w, b.aggregate()).tobytes()
    assert a.step(w, a.aggregate()).tobytes() == apply_mean_delta(w, a.aggregate().total, a.round_summary()["samples"]).tobytes()
    assert a.round_summary() == b.round_summary()


def test_unknown_strategy_is_a_usage_error():
    with pytest.raises(UsageError, match="fedavg") as exc:
        make_strategy("krum")
    assert (
        str(exc.value)
        == "--strategy 'krum' is not one of: fedavg, median, trimmed-mean, fedavgm, fedadam, fedyogi, fedadagrad, clipped-fedavg, dp-fedavg, fedprox"
    )
    assert type(make_strategy("fedavg")) is FedAvg


# ------------------------------------------------------------------ validation


def check(store, payload, device="dev-a", accepted=None, previous=None, topic=None):
    return validate_update(
        topic or T.update(device),
        payload,
        topics=T,
        num_params=N,
        version=store,
        accepted=accepted or {},
        previous_accepted=previous or {},
    )


def reason_of(store, payload, **kw) -> str:
    with pytest.raises(Rejection) as info:
        check(store, payload, **kw)
    return info.value.reason


def test_validation_accepts_a_good_update(store):
    u = make_update(store)
    v = check(store, u.encode())
    assert not v.duplicate and v.update.nonce == u.nonce and v.update.samples == 10


def test_validation_rejects_with_one_line_reasons(store):
    good = make_update(store).encode()
    assert "bound" in reason_of(store, good + b"\0" * (max_update_bytes(N) - len(good) + 1))
    assert "truncated" in reason_of(store, good[:-3])
    assert "parameters" in reason_of(store, make_update(store, delta=np.zeros(N - 1, np.float32)).encode())
    assert "NaN" in reason_of(store, make_update(store, delta=np.array([np.nan] + [0] * (N - 1), np.float32)).encode())
    assert "does not match the topic" in reason_of(store, make_update(store, device="dev-b").encode())
    assert "not the current run" in reason_of(store, make_update(store, run_id="f" * 32).encode())
    assert "not the current model" in reason_of(store, make_update(store, model_hash="cd" * 32).encode())
    assert "round 2 not open" in reason_of(store, make_update(store, rnd=2).encode())
    assert reason_of(store, b"") == "empty payload"
    with pytest.raises(Rejection) as info:
        check(store, good, topic="fleetlearn/unit/update/bad id")
    assert info.value.device is None


def test_rejection_of_a_nan_update_still_names_its_nonce_and_round(store):
    u = make_update(store, delta=np.full(N, np.inf, np.float32))
    with pytest.raises(Rejection) as info:
        check(store, u.encode())
    assert (info.value.device, info.value.round, info.value.nonce) == ("dev-a", 1, u.nonce)


def test_duplicates_same_nonce_is_idempotent_other_nonce_rejected(store):
    u = make_update(store)
    v = check(store, u.encode(), accepted={"dev-a": u.nonce})
    assert v.duplicate and "counted once" in v.note
    other = make_update(store)
    assert reason_of(store, other.encode(), accepted={"dev-a": u.nonce}) == "duplicate update for round 1"


def test_stale_round_is_rejected_but_a_counted_resend_is_acknowledged(store):
    store.commit(1, np.zeros(N, np.float32), {"round": 1}, {"dev-a": "1" * 32})
    assert "round 1 closed" in reason_of(store, make_update(store, rnd=1).encode())
    v = check(store, make_update(store, rnd=1, nonce="1" * 32).encode(), previous=store.last_accepted)
    assert v.duplicate and "counted before it closed" in v.note
    assert store.check_version(store.run_id, HASH, 2) is None


# ------------------------------------------------------------------ durable state


def test_store_resumes_bit_identical_and_refuses_another_model(tmp_path, store):
    w1 = np.random.default_rng(2).normal(size=N).astype(np.float32)
    store.commit(1, w1, {"round": 1, "devices": ["dev-a"]}, {"dev-a": "1" * 32})
    again = ModelStore.open(tmp_path / "state", HASH, N, lambda: pytest.fail("must not re-initialise"))
    assert (again.run_id, again.round) == (store.run_id, 1)
    assert again.weights.tobytes() == w1.tobytes()
    with pytest.raises(StateError, match="fresh --state-dir"):
        ModelStore.open(tmp_path / "state", "cd" * 32, N, lambda: np.zeros(N, np.float32))
    (tmp_path / "state" / "global" / "round_0001.f32").write_bytes(b"\0" * 4 * N)
    with pytest.raises(StateError, match="sha256"):
        ModelStore.open(tmp_path / "state", HASH, N, lambda: np.zeros(N, np.float32))


def test_accepted_json_grows_by_appending_and_equals_a_full_encoding():
    """Each group-commit write encodes only the newly accepted pairs (AcceptedJson keeps the
    earlier writes' pairs as chunks): the header's array is the full encoding, in arrival order."""
    inc, accepted = AcceptedJson(), {}
    assert inc.of(1, accepted) == "[]"
    for i in range(40):
        accepted[f"dev-{i}"] = secrets.token_hex(16)
        if i % 7 == 0:
            assert inc.of(1, accepted) == accepted_json(accepted.items())
    assert json.loads(inc.of(1, accepted)) == [[d, n] for d, n in accepted.items()]
    assert inc.of(1, dict(accepted)) == accepted_json(accepted.items())  # another dict (a resumed round)
    assert inc.of(2, {"x": "0" * 32}) == accepted_json([("x", "0" * 32)])  # another round starts afresh


def test_a_crash_between_state_and_round_log_is_repaired(tmp_path, store):
    store.commit(1, np.ones(N, np.float32), {"round": 1, "x": 1}, {})
    store.rounds_log.unlink()  # as if killed right after state.json was renamed
    again = ModelStore.open(tmp_path / "state", HASH, N, lambda: np.zeros(N, np.float32))
    assert [r.to_doc() for r in read_round_log(again.rounds_log).records] == [{"round": 1, "x": 1}]


def test_partial_round_round_trip_and_stale_partial_is_dropped(tmp_path, store):
    acc = np.random.default_rng(3).normal(size=N)
    p = PartialRound(
        store.run_id,
        1,
        {"dev-a": "a" * 32, "dev-b": "b" * 32},
        {"sum": acc, "total_samples": 5, "loss_sum": 2.5},
        123.0,
        10,
        20,
        1,
        2,
    )
    store.save_partial(p)
    q = store.load_partial(1)
    assert q is not None and q.accepted == p.accepted and list(q.accepted) == ["dev-a", "dev-b"]
    assert q.strategy["sum"].tobytes() == acc.tobytes() and q.strategy["total_samples"] == 5
    assert (q.bytes_in, q.bytes_out, q.rejected, q.extensions) == (10, 20, 1, 2)
    assert store.load_partial(2) is None
    store.commit(1, np.ones(N, np.float32), {"round": 1}, p.accepted)
    assert not store.partial_path.exists()
    store.save_partial(p)  # a partial of an already committed round: ignored and removed on open
    ModelStore.open(tmp_path / "state", HASH, N, lambda: np.zeros(N, np.float32))
    assert not store.partial_path.exists()


def test_corrupt_partial_fails_loudly_and_is_kept_aside(store):
    store.save_partial(PartialRound(store.run_id, 1, {}, {"sum": np.zeros(N), "total_samples": 0, "loss_sum": 0.0}))
    raw = bytearray(store.partial_path.read_bytes())
    raw[-1] ^= 0xFF
    store.partial_path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="corrupt"):
        store.load_partial(1)
    assert store.partial_path.with_suffix(".bin.corrupt").exists() and not store.partial_path.exists()


def test_round_log_is_rewritten_whole_and_a_reclosed_round_logged_once(tmp_path):
    path = tmp_path / "rounds.jsonl"
    run, old_run = "a" * 32, "b" * 32
    rec = lambda rnd, a, run_id=run: RoundMetrics.from_doc({"round": rnd, "run_id": run_id, "a": a})  # noqa: E731
    append_round_record(path, rec(1, 0, old_run))  # an earlier run's round 1 stays, first
    append_round_record(path, rec(1, 1))
    path.write_bytes(path.read_bytes() + b'{"round": 2, "tor')  # a foreign torn line
    append_round_record(path, rec(2, 2))
    append_round_record(path, rec(2, 3))
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"round": 1, "run_id": old_run, "a": 0},
        {"round": 1, "run_id": run, "a": 1},
        {"round": 2, "run_id": run, "a": 3},
    ]
    log = read_round_log(path)
    assert [(r.round, r.extra["a"]) for r in log.rounds] == [(1, 1), (2, 3)] and log.other_runs == 1 and not log.torn_tail


# ------------------------------------------------------------------ bundle distribution


def test_bundle_chunks_reassemble_with_the_device_assembler(tmp_path, boston_bundle):
    manifest = load_bundle(boston_bundle)
    plan = plan_bundle(boston_bundle, manifest, chunk_size=4096)
    a = plan.announcement
    assert a.chunks == -(-a.total_bytes // 4096) and a.chunks > 1
    decoded = BundleAnnouncement.decode(a.encode())
    assembly = BundleAssembly(decoded)
    topics = Topics("unit")
    msgs = list(chunk_messages(plan, topics))
    assert [t for t, _ in msgs] == [topics.bundle_chunk(a.model_hash, i) for i in range(a.chunks)]
    for _, payload in reversed(msgs):  # order must not matter
        assembly.add(payload)
    assert assembly.complete
    installed = assembly.install(tmp_path / "fetched")
    assert installed.model_hash == manifest.model_hash
    for name in manifest.files:
        assert (tmp_path / "fetched" / name).read_bytes() == (boston_bundle / name).read_bytes()
    clears = list(clear_messages(a, topics))
    assert len(clears) == a.chunks and all(p == b"" for _, p in clears)


def test_chunk_size_bounds(boston_bundle):
    manifest = load_bundle(boston_bundle)
    with pytest.raises(UsageError):
        plan_bundle(boston_bundle, manifest, chunk_size=100)


def test_update_size_bound_formula():
    assert max_update_bytes(10) == 24 + 8 * 1024 + (40 + 16) + 512  # body: float32 + the encodings' headroom
    assert struct.calcsize("<4sBBBBIIIHH") == 24


# ------------------------------------------------------------------ events


def test_one_call_logs_and_notifies_every_listener(caplog):
    import logging

    from fleetlearn.aggregator.events import Events

    got: list[tuple[str, dict]] = []

    def broken(name, fields):
        raise RuntimeError("listener bug")

    ev = Events(lambda n, f: got.append((n, f)))
    ev.listen(broken)
    ev.listen(lambda n, f: got.append(("second:" + n, f)))
    with caplog.at_level(logging.INFO, logger="fleetlearn.aggregator"):
        ev.emit("round_failed", 3, level=logging.ERROR, reason="why it failed")
        ev.emit("update_rejected", 3, device="pi-07", reason="bad")
        ev.log("update_duplicate", 3, device="pi-07")  # a log line only
        ev.emit("round_closed", 3, notify={"round": 3, "devices": ["a"]}, accepted=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "fleetlearn.aggregator"]
    assert 'event=round_failed round=3 reason="why it failed"' in lines
    assert (
        "event=update_rejected device=pi-07 round=3 reason=bad" in lines
        and "event=update_duplicate device=pi-07 round=3" in lines
    )
    assert sum("event=on_event_failed" in line for line in lines) == 3  # the broken listener, once per emit
    assert got == [
        ("round_failed", {"round": 3, "reason": "why it failed"}),
        ("second:round_failed", {"round": 3, "reason": "why it failed"}),
        ("update_rejected", {"round": 3, "device": "pi-07", "reason": "bad"}),
        ("second:update_rejected", {"round": 3, "device": "pi-07", "reason": "bad"}),
        ("round_closed", {"round": 3, "devices": ["a"]}),
        ("second:round_closed", {"round": 3, "devices": ["a"]}),
    ]


def test_update_norm_telemetry_streams_and_survives_the_partial_round():
    """update_norm = sum n_i ||d_i|| / sum n_i and update_norm_max, from two numbers and a count,
    persisted with the open round and restored bit for bit."""
    from fleetlearn.aggregator.intake import NormStats

    rng = np.random.default_rng(9)
    deltas = [rng.normal(0, s, 500) for s in (0.01, 1.0, 0.3)]
    ns = [3, 1, 7]
    stats = NormStats()
    assert stats.summary() == {}
    for d, n in zip(deltas, ns):
        stats.add(float(np.sqrt(np.sum(d.astype(np.float64) ** 2))), n)
    norms = [np.linalg.norm(d) for d in deltas]
    want = sum(n * x for n, x in zip(ns, norms)) / sum(ns)
    assert stats.summary()["update_norm"] == pytest.approx(want, rel=1e-12) and stats.summary()[
        "update_norm_max"
    ] == pytest.approx(max(norms), rel=1e-12)
    raw = encode_partial(PartialRound("a" * 32, 1, {"d": "1" * 32}, {}, norms=stats.to_doc()))
    assert NormStats.from_doc(decode_partial(raw).norms) == stats
    assert NormStats.from_doc({}) == NormStats()

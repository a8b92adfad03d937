"""Hostile encoded updates and hostile update parts against a real aggregator on a real
mosquitto, generated with Hypothesis (the same collect-then-publish scheme as
tests/test_faults_hostile.py, whose helpers this reuses): for every body encoding (fp16, int8
blocks, top-k) bodies of the wrong length, non-finite values, bad block sizes, negative or
non-finite or overflowing scales, the int8 code -128, top-k counts out of bounds, indices out of
range, repeated or decreasing, and PART frames that lie about their layout, are out of range,
oversized, of the wrong length or corrupted. Each one is built invalid by construction, must
cost exactly one `event=update_rejected` line and one negative ack, and the round's result
(honest updates sent as fp16, int8 and top-k) must be bit-identical to a clean run.
"""

from __future__ import annotations

import os
import re
import secrets
import time

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import (
    NAME_RE,
    Ack,
    Compression,
    GlobalModel,
    Part,
    Topics,
    Update,
    decode_tensor,
    encode_tensor,
)
from fleetlearn.edge_runtime.core.protocol.parts import MIN_PART_BYTES
from tests.peers import Recorder
from tests.test_faults import AggProc, agg_args, agg_events, procs, rounds_log, state_weights  # noqa: F401  (procs: fixture)
from tests.test_faults_hostile import HONEST, LOSSES, SAMPLES, VALID_TOPIC_DEVICES, Ctx, Hostile, dump, frame, meta_doc

N_HOSTILE = 500
SEED = int(os.environ.get("FLEETLEARN_FAULTS_SEED", "20261201"))
HONEST_COMPRESSION = ("fp16", "int8:64", "topk:0.1")
u32 = np.dtype("<u4")


def _device(draw) -> str:
    return draw(st.sampled_from(VALID_TOPIC_DEVICES))


def _meta(draw, ctx: Ctx, device: str) -> bytes:
    return dump(
        meta_doc(
            ctx, device, draw(st.binary(min_size=16, max_size=16).map(bytes.hex).filter(lambda h: h not in ctx.honest_nonces))
        )
    )


def _delta(draw, n: int) -> np.ndarray:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(0, 0.01, n).astype(np.float32)


def _encoded(draw, ctx: Ctx, device: str, body: bytes, enc: int) -> bytes:
    return frame(_meta(draw, ctx, device), body, encoding=enc)


def _bad_float_bits(draw, half: bool) -> int:
    if half:
        return (draw(st.integers(0, 1)) << 15) | 0x7C00 | draw(st.integers(0, 2**10 - 1))
    return (draw(st.integers(0, 1)) << 31) | 0x7F800000 | draw(st.integers(0, 2**23 - 1))


def m_fp16_length(draw, ctx):
    d = _device(draw)
    k = draw(st.integers(-(2 * ctx.n - 1), 300).filter(lambda v: v != 0))
    body = np.zeros(2 * ctx.n + k, np.uint8).tobytes()
    return Hostile("fp16_length", d, _encoded(draw, ctx, d, body, 2))


def m_fp16_nonfinite(draw, ctx):
    d = _device(draw)
    bits = encode_tensor(_delta(draw, ctx.n), Compression("fp16"))[1]
    arr = np.frombuffer(bits, "<u2").copy()
    for i in draw(st.lists(st.integers(0, ctx.n - 1), min_size=1, max_size=5)):
        arr[i] = _bad_float_bits(draw, True)
    return Hostile("fp16_nonfinite", d, _encoded(draw, ctx, d, arr.tobytes(), 2))


def _int8(draw, ctx, block=None) -> tuple[int, np.ndarray, np.ndarray]:
    block = block or draw(st.sampled_from([8, 16, 64, 256, 4096]))
    body = encode_tensor(_delta(draw, ctx.n), Compression("int8", block=block))[1]
    nb = -(-ctx.n // block)
    return block, np.frombuffer(body, "<f4", nb, 4).copy(), np.frombuffer(body, np.int8, ctx.n, 4 + 4 * nb).copy()


def _int8_body(block: int, scales: np.ndarray, q: np.ndarray) -> bytes:
    return np.array([block], u32).tobytes() + scales.astype("<f4").tobytes() + q.astype(np.int8).tobytes()


def m_int8_block(draw, ctx):
    d = _device(draw)
    _, scales, q = _int8(draw, ctx, 16)
    block = draw(st.integers(0, 7) | st.integers(65537, 2**32 - 1))
    return Hostile("int8_block", d, _encoded(draw, ctx, d, _int8_body(block, scales, q), 3))


def m_int8_length(draw, ctx):
    d = _device(draw)
    block, scales, q = _int8(draw, ctx)
    body = _int8_body(block, scales, q)
    k = draw(st.integers(-(len(body) - 1), 300).filter(lambda v: v != 0))
    body = body[:k] if k < 0 else body + bytes(k)
    return Hostile("int8_length", d, _encoded(draw, ctx, d, body, 3))


def m_int8_scale(draw, ctx):
    d = _device(draw)
    block, scales, q = _int8(draw, ctx)
    i = draw(st.integers(0, scales.size - 1))
    bits = scales.view("<u4")
    if draw(st.booleans()):
        bits[i] = _bad_float_bits(draw, False)
    else:
        scales[i] = -draw(st.floats(1e-30, 1e30))
    return Hostile("int8_scale", d, _encoded(draw, ctx, d, _int8_body(block, scales, q), 3))


def m_int8_code(draw, ctx):
    d = _device(draw)
    block, scales, q = _int8(draw, ctx)
    for i in draw(st.lists(st.integers(0, ctx.n - 1), min_size=1, max_size=5)):
        q[i] = -128
    return Hostile("int8_code", d, _encoded(draw, ctx, d, _int8_body(block, scales, q), 3))


def m_int8_overflow(draw, ctx):
    """Finite scales whose product with a code overflows float32."""
    d = _device(draw)
    block, scales, q = _int8(draw, ctx)
    i = draw(st.integers(0, scales.size - 1))
    scales[i] = draw(st.floats(3.4e38 / 127 * 1.01, 3.4e38))
    q[i * block] = draw(st.sampled_from([127, -127]))
    return Hostile("int8_overflow", d, _encoded(draw, ctx, d, _int8_body(block, scales, q), 3))


def _topk_body(k: int, idx, vals) -> bytes:
    return np.array([k], u32).tobytes() + np.asarray(idx, u32).tobytes() + np.asarray(vals, "<f4").tobytes()


def _topk(draw, ctx) -> tuple[np.ndarray, np.ndarray]:
    k = draw(st.integers(2, 40))
    idx = np.array(sorted(draw(st.sets(st.integers(0, ctx.n - 1), min_size=k, max_size=k))), dtype=np.int64)
    return idx, _delta(draw, k)


def m_topk_count(draw, ctx):
    d = _device(draw)
    kmax = -(-ctx.n // 2)
    k = draw(st.just(0) | st.integers(kmax + 1, ctx.n + 10))
    idx = np.arange(k) % ctx.n
    return Hostile("topk_count", d, _encoded(draw, ctx, d, _topk_body(k, idx, np.zeros(k)), 4))


def m_topk_length(draw, ctx):
    d = _device(draw)
    idx, vals = _topk(draw, ctx)
    body = _topk_body(idx.size, idx, vals)
    k = draw(st.integers(-(len(body) - 1), 64).filter(lambda v: v != 0))
    body = body[:k] if k < 0 else body + bytes(k)
    return Hostile("topk_length", d, _encoded(draw, ctx, d, body, 4))


def m_topk_order(draw, ctx):
    d = _device(draw)
    idx, vals = _topk(draw, ctx)
    i = draw(st.integers(1, idx.size - 1))
    if draw(st.booleans()):
        idx[i] = idx[i - 1]  # repeated
    else:
        idx[i - 1], idx[i] = idx[i], idx[i - 1]  # decreasing
    return Hostile("topk_order", d, _encoded(draw, ctx, d, _topk_body(idx.size, idx, vals), 4))


def m_topk_range(draw, ctx):
    d = _device(draw)
    idx, vals = _topk(draw, ctx)
    idx[-1] = draw(st.integers(ctx.n, 2**32 - 1))
    return Hostile("topk_range", d, _encoded(draw, ctx, d, _topk_body(idx.size, idx, vals), 4))


def m_topk_value(draw, ctx):
    d = _device(draw)
    idx, vals = _topk(draw, ctx)
    bits = vals.view("<u4")
    bits[draw(st.integers(0, vals.size - 1))] = _bad_float_bits(draw, False)
    return Hostile("topk_value", d, _encoded(draw, ctx, d, _topk_body(idx.size, idx, vals), 4))


def m_part(draw, ctx):
    """A PART frame that lies about its layout, is out of range, oversized, short or corrupted."""
    d = _device(draw)
    total = draw(st.integers(MIN_PART_BYTES + 1, 4 * ctx.n))
    size = draw(st.integers(MIN_PART_BYTES, total - 1))
    count = -(-total // size)
    p = dict(id=draw(st.binary(min_size=32, max_size=32)).hex(), index=0, count=count, total=total, size=size)
    how = draw(st.sampled_from(["index", "count", "oversized", "short", "long", "small_size", "crc", "bad_id"]))
    data = bytes(size)
    if how == "index":
        p["index"] = draw(st.integers(count, count + 100))
    elif how == "count":
        p["count"] = draw(st.integers(1, 2**20).filter(lambda c: c != count))
    elif how == "oversized":
        p["total"] = draw(st.integers(16 * ctx.n + 10_000, 2**40))
        p["count"] = -(-p["total"] // size)
    elif how == "short":
        data = bytes(draw(st.integers(0, size - 1)))
    elif how == "long":
        data = bytes(size + draw(st.integers(1, 100)))
    elif how == "small_size":
        p["size"] = draw(st.integers(1, MIN_PART_BYTES - 1))
        p["count"] = -(-total // p["size"])
        data = bytes(p["size"])
    elif how == "bad_id":
        p["id"] = draw(st.text(max_size=70).filter(lambda s: not re.fullmatch(r"[0-9a-f]{64}", s)))
    payload = frame(dump(p), data, kind=4, encoding=1)
    if how == "crc":
        body_at = len(payload) - len(data)
        payload = payload[:body_at] + bytes([payload[body_at] ^ 0xFF]) + payload[body_at + 1 :]
    return Hostile(f"part_{how}", d, payload)


MUTATIONS = {
    f.__name__[2:]: f
    for f in (
        m_fp16_length,
        m_fp16_nonfinite,
        m_int8_block,
        m_int8_length,
        m_int8_scale,
        m_int8_code,
        m_int8_overflow,
        m_topk_count,
        m_topk_length,
        m_topk_order,
        m_topk_range,
        m_topk_value,
        m_part,
    )
}


def collect(ctx: Ctx, n: int) -> list[Hostile]:
    out: list[Hostile] = []

    @seed(SEED)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def gen(data):
        label = data.draw(st.sampled_from(sorted(MUTATIONS)))
        out.append(MUTATIONS[label](data.draw, ctx))

    gen()
    return out


def honest(g: GlobalModel, n: int) -> list[tuple[Update, bytes]]:
    rng = np.random.default_rng(11)
    out = []
    for i, spec in enumerate(HONEST_COMPRESSION):
        u = Update(
            g.run_id,
            g.round,
            HONEST[i],
            g.model_hash,
            SAMPLES[i],
            LOSSES[i],
            0.01,
            secrets.token_hex(16),
            rng.normal(0, 0.05, n).astype(np.float32),
        )
        out.append((u, u.encode(compression=Compression.parse(spec))))
    return out


def run_round(mosquitto, tmp_path, bundle, fleet: str, procs, attack: bool):
    T = Topics(fleet)
    n = load_bundle(bundle).num_params
    state = tmp_path / f"state-{fleet}"
    wire = Recorder(mosquitto.url, [T.global_model, T.ack("+")], f"wire-{fleet}")
    procs.append(wire)
    agg = AggProc(tmp_path, mosquitto.url, fleet, bundle, state, *agg_args(1, 3, 3, 600), name=f"agg-{fleet}")
    procs.append(agg)
    g = wire.wait(lambda t, p: t == T.global_model and (x := GlobalModel.decode(p)).round == 1 and x, timeout=60)
    ups = honest(g, n)

    def send(i: int) -> None:
        u, payload = ups[i]
        wire.publish(T.update(u.device_id), payload)
        wire.wait(lambda t, p: t == T.ack(u.device_id) and (a := Ack.decode(p)).nonce == u.nonce and a.accepted, timeout=30)

    send(0)
    send(1)
    hostile: list[Hostile] = []
    if attack:
        ctx = Ctx(g.run_id, g.model_hash, n, 1, {}, frozenset(u.nonce for u, _ in ups))
        hostile = list({(h.device, h.payload): h for h in collect(ctx, N_HOSTILE)}.values())
        pub = Recorder(mosquitto.url, [], f"hostile-{fleet}")
        procs.append(pub)
        for info in [pub.client.publish(f"{T.base}/update/{h.device}", h.payload, qos=1) for h in hostile]:
            info.wait_for_publish(60)
        end = time.monotonic() + 60
        while (
            len(agg_events(agg.text(), "update_rejected")) < len(hostile) and agg.proc.poll() is None and time.monotonic() < end
        ):
            time.sleep(0.2)
    send(2)
    assert agg.wait(60) == 0, agg.text()[-3000:]
    return state, agg, wire, g, ups, hostile


def test_hostile_encoded_updates_and_parts_are_each_rejected_once_and_change_nothing(mosquitto, tmp_path, boston_bundle, procs):
    clean_state, _, _, g_clean, clean_ups, _ = run_round(mosquitto, tmp_path, boston_bundle, "enc-clean", procs, attack=False)
    state, agg, wire, g, ups, hostile = run_round(mosquitto, tmp_path, boston_bundle, "enc-attacked", procs, attack=True)

    assert len(hostile) >= 400 and {h.label.split("_")[0] for h in hostile} == {"fp16", "int8", "topk", "part"}
    assert {h.label for h in hostile if not h.label.startswith("part")} == set(MUTATIONS) - {"part"}
    text = agg.text()
    rejected = agg_events(text, "update_rejected")
    assert len(rejected) == len(hostile), "\n".join(l for l in text.splitlines() if "update_accepted" in l or "Traceback" in l)[
        :3000
    ]
    assert all(re.search(r" reason=\S", line) for line in rejected)
    assert "handler_failed" not in text and "Traceback" not in text
    assert len(agg_events(text, "update_accepted")) == 3
    acks = [Ack.decode(p) for t, p, _ in wire.snapshot() if t.startswith(Topics("enc-attacked").base + "/ack/")]
    assert len([a for a in acks if not a.accepted]) == len(hostile)
    assert sum(1 for h in hostile if NAME_RE.fullmatch(h.device)) == len(hostile)

    (rec,) = rounds_log(state)
    assert rec["devices"] == list(HONEST) and rec["rejected"] == len(hostile)
    clean, attacked = state_weights(clean_state, 1), state_weights(state, 1)
    assert attacked.tobytes() == clean.tobytes()
    # and that result is FedAvg of what the encodings decode to (lossy, but decoded exactly once)
    w = g.weights.astype(np.float64)
    decoded = [
        decode_tensor(*encode_tensor(u.delta, Compression.parse(s)), u.delta.size) for (u, _), s in zip(ups, HONEST_COMPRESSION)
    ]
    expect = w + sum(s * d.astype(np.float64) for s, d in zip(SAMPLES, decoded)) / sum(SAMPLES)
    np.testing.assert_allclose(attacked, expect, rtol=1e-6, atol=1e-7)


def test_update_parts_resume_after_a_reconnect_and_count_once(mosquitto, tmp_path, boston_bundle, procs):
    """A device that lost its connection halfway through its parts re-sends them all (the same
    bytes): the aggregator continues the partial message it holds, counts the update once, and
    a part repeated with other bytes in between is refused without spoiling the rest."""
    fleet = "enc-resume"
    T = Topics(fleet)
    n = load_bundle(boston_bundle).num_params
    state = tmp_path / "state-resume"
    wire = Recorder(mosquitto.url, [T.global_model, T.ack("+")], "wire-resume")
    procs.append(wire)
    agg = AggProc(tmp_path, mosquitto.url, fleet, boston_bundle, state, *agg_args(1, 1, 1, 600), name="agg-resume")
    procs.append(agg)
    g = wire.wait(lambda t, p: t == T.global_model and (x := GlobalModel.decode(p)).round == 1 and x, timeout=60)
    u = Update(
        g.run_id,
        1,
        "dev-a",
        g.model_hash,
        10,
        1.0,
        0.1,
        secrets.token_hex(16),
        np.random.default_rng(3).normal(0, 0.05, n).astype(np.float32),
    )
    from fleetlearn.edge_runtime.core.protocol import split_message

    parts = split_message(u.encode(), 2600)
    assert len(parts) == 4
    first = Recorder(mosquitto.url, [], "dev-a-first")
    procs.append(first)
    first.publish(T.update("dev-a"), parts[0])
    first.publish(T.update("dev-a"), parts[1])
    time.sleep(0.5)
    first.close()  # the link drops
    # A forged part 1 (same message id and layout, other bytes): refused, the partial stays intact.
    m = Part.decode(parts[1], 1 << 20)
    forged = Part(m.id, 1, m.count, m.total, m.size, bytes(len(m.data))).encode()
    again = Recorder(mosquitto.url, [], "dev-a-again")
    procs.append(again)
    again.publish(T.update("dev-a"), forged)
    for p in parts:  # the reconnected device re-sends everything, part by part
        again.publish(T.update("dev-a"), p)
    wire.wait(lambda t, p: t == T.ack("dev-a") and (a := Ack.decode(p)).nonce == u.nonce and a.accepted, timeout=30)
    assert agg.wait(60) == 0, agg.text()[-3000:]
    text = agg.text()
    (rejected,) = agg_events(text, "update_rejected")
    assert "different bytes" in rejected
    assert len(agg_events(text, "update_accepted")) == 1 and "update_duplicate" not in text
    (rec,) = rounds_log(state)
    assert rec["devices"] == ["dev-a"] and rec["samples"] == 10
    np.testing.assert_allclose(state_weights(state, 1), g.weights + u.delta, rtol=1e-6, atol=1e-7)

"""Tensor body encodings, error feedback and message parts, as pure functions on real frames:
every encoding round-trips within its stated bound, every kind of hostile body and bad part is
refused with a one-line reason, and error feedback loses nothing (the math, checked exactly)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import (
    ChunkAssembly,
    Compression,
    Encoding,
    Part,
    Reassembler,
    RoundConfig,
    Update,
    decode_tensor,
    encode_tensor,
    feedback_step,
    max_body_bytes,
    split_message,
)
from fleetlearn.edge_runtime.core.protocol.parts import part_capacity
from fleetlearn.edge_runtime.device.feedback import SETTLED, ErrorFeedback

SPECS = ["none", "fp16", "int8", "int8:8", "int8:4096", "topk:0.01", "topk:0.1", "topk:0.5"]


def vec(n: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [1, 2, 7, 1657, 10_001])
def test_round_trip_within_the_stated_bound(spec, n):
    c = Compression.parse(spec)
    x = vec(n, n)
    enc, body = encode_tensor(x, c)
    assert enc == c.encoding and len(body) <= max_body_bytes(n)
    y = decode_tensor(enc, body, n)
    assert y.dtype == np.float32 and y.shape == (n,)
    if c.kind == "none":
        assert np.array_equal(x, y)
    elif c.kind == "fp16":
        assert np.all(np.abs(x - y) <= 2.0**-11 * np.abs(x) + 2.0**-25)
    elif c.kind == "int8":
        b = c.block
        for s in range(0, n, b):
            blk = x[s : s + b]
            assert np.all(np.abs(blk - y[s : s + b]) <= np.abs(blk).max() / 254 * (1 + 1e-6) + 1e-12)
    else:
        k = int(np.count_nonzero(y))
        assert k == min(max(1, int(np.ceil(c.fraction * n))), -(-n // 2))
        kept = np.nonzero(y)[0]
        assert np.array_equal(y[kept], x[kept])  # kept values are exact
        assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max(initial=0)  # the largest ones
    # deterministic: the same vector gives the same bytes (a re-send is the same frame)
    assert encode_tensor(x, c)[1] == body


def test_compression_text_forms():
    assert str(Compression.parse("int8")) == "int8:512"
    assert str(Compression.parse("topk:0.01")) == "topk:0.01"
    for bad in [
        "",
        "gzip",
        "int8:7",
        "int8:x",
        "int8:65537",
        "topk",
        "topk:0",
        "topk:0.6",
        "topk:nan",
        "fp16:2",
        "none:1",
        "x" * 100,
    ]:
        with pytest.raises(ProtocolError):
            Compression.parse(bad)
    cfg = RoundConfig.from_meta({"compression": "int8:64", "max_message_size": 131072})
    assert cfg.compression_spec == Compression("int8", block=64)
    with pytest.raises(ProtocolError):
        RoundConfig.from_meta({"max_message_size": 1000})  # too small for the JSON messages


def test_fp16_saturates_instead_of_overflowing():
    x = np.array([1e6, -1e6, 1.0], dtype=np.float32)
    y = decode_tensor(*encode_tensor(x, Compression("fp16")), 3)
    assert np.isfinite(y).all() and y[0] == 65504.0 and y[1] == -65504.0


# ------------------------------------------------------------------ hostile bodies

N = 100


def hostile_bodies() -> list[tuple[str, Encoding, bytes]]:
    """(what, encoding, body): each one wrong in exactly one way."""
    u32 = struct.Struct("<I").pack
    x = vec(N)
    _, f16 = encode_tensor(x, Compression("fp16"))
    _, i8 = encode_tensor(x, Compression("int8", block=16))
    nb = -(-N // 16)
    scales = np.frombuffer(i8, "<f4", nb, 4)
    out = [
        ("f32 short", Encoding.F32_LE, b"\0" * (4 * N - 4)),
        ("f32 nan", Encoding.F32_LE, np.full(N, np.nan, "<f4").tobytes()),
        ("f16 short", Encoding.F16_LE, f16[:-2]),
        ("f16 long", Encoding.F16_LE, f16 + b"\0\0"),
        ("f16 inf", Encoding.F16_LE, np.full(N, np.inf, "<f2").tobytes()),
        ("f16 nan", Encoding.F16_LE, f16[:-2] + np.array([np.nan], "<f2").tobytes()),
        ("int8 empty", Encoding.INT8_BLOCK, b""),
        ("int8 block 0", Encoding.INT8_BLOCK, u32(0) + i8[4:]),
        ("int8 block too big", Encoding.INT8_BLOCK, u32(1 << 20) + i8[4:]),
        ("int8 block lies", Encoding.INT8_BLOCK, u32(32) + i8[4:]),
        ("int8 truncated", Encoding.INT8_BLOCK, i8[:-1]),
        ("int8 padded", Encoding.INT8_BLOCK, i8 + b"\0"),
        ("int8 nan scale", Encoding.INT8_BLOCK, i8[:4] + np.array([np.nan], "<f4").tobytes() + i8[8:]),
        ("int8 negative scale", Encoding.INT8_BLOCK, i8[:4] + np.array([-1.0], "<f4").tobytes() + i8[8:]),
        ("int8 inf scale", Encoding.INT8_BLOCK, i8[:4] + np.array([np.inf], "<f4").tobytes() + i8[8:]),
        (
            "int8 overflowing scale",
            Encoding.INT8_BLOCK,
            i8[:4] + np.full(nb, 3e38, "<f4").tobytes() + np.full(N, 127, np.int8).tobytes(),
        ),
        ("int8 code -128", Encoding.INT8_BLOCK, i8[:4] + scales.tobytes() + np.full(N, -128, np.int8).tobytes()),
        ("topk empty", Encoding.TOPK, b""),
        ("topk k=0", Encoding.TOPK, u32(0)),
        ("topk k too big", Encoding.TOPK, u32(N // 2 + 1) + b"\0" * 8 * (N // 2 + 1)),
        ("topk k lies", Encoding.TOPK, u32(3) + np.array([1, 2], "<u4").tobytes() + np.ones(2, "<f4").tobytes()),
        ("topk index out of range", Encoding.TOPK, u32(2) + np.array([1, N], "<u4").tobytes() + np.ones(2, "<f4").tobytes()),
        ("topk duplicate index", Encoding.TOPK, u32(2) + np.array([5, 5], "<u4").tobytes() + np.ones(2, "<f4").tobytes()),
        ("topk decreasing", Encoding.TOPK, u32(2) + np.array([6, 5], "<u4").tobytes() + np.ones(2, "<f4").tobytes()),
        ("topk huge index", Encoding.TOPK, u32(1) + np.array([2**32 - 1], "<u4").tobytes() + np.ones(1, "<f4").tobytes()),
        ("topk nan value", Encoding.TOPK, u32(1) + np.array([3], "<u4").tobytes() + np.array([np.nan], "<f4").tobytes()),
        ("topk inf value", Encoding.TOPK, u32(1) + np.array([3], "<u4").tobytes() + np.array([-np.inf], "<f4").tobytes()),
        ("raw is no tensor", Encoding.RAW, b"\0" * 4 * N),
    ]
    return out


@pytest.mark.parametrize("what,encoding,body", hostile_bodies(), ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_body_is_refused_with_one_line(what, encoding, body):
    with pytest.raises(ProtocolError) as e:
        decode_tensor(encoding, body, N)
    assert "\n" not in e.value.reason and e.value.reason


@settings(max_examples=400, deadline=None)
@given(
    enc=st.sampled_from([Encoding.F16_LE, Encoding.INT8_BLOCK, Encoding.TOPK]),
    body=st.binary(max_size=600),
    n=st.integers(1, 150),
)
def test_random_bodies_decode_to_finite_or_refuse(enc, body, n):
    try:
        y = decode_tensor(enc, body, n)
    except ProtocolError as exc:
        assert "\n" not in exc.reason
        return
    assert y.shape == (n,) and np.isfinite(y).all()


def test_update_frames_carry_any_encoding():
    u = Update("a" * 32, 3, "dev-1", "b" * 64, 10, 0.5, 0.1, "c" * 32, vec(1657))
    for spec in SPECS:
        c = Compression.parse(spec)
        payload = u.encode(compression=c)
        back = Update.decode(payload, 1657)
        assert np.array_equal(back.delta, decode_tensor(*encode_tensor(u.delta, c), 1657))
        with pytest.raises(ProtocolError):
            Update.decode(payload, 1658)


# ------------------------------------------------------------------ error feedback


def test_error_feedback_loses_nothing_exactly():
    """Per step c_t + e_{t+1} == e_t + D_t bit for bit (float32), so over T steps the sum of what
    was sent plus the final residual equals the sum of the true deltas up to float32 rounding of
    the additions (checked in float64 against an explicit bound)."""
    c = Compression("topk", fraction=0.01)
    n, residual = 5000, None
    sent_sum = np.zeros(n)
    true_sum = np.zeros(n)
    for t in range(30):
        d = vec(n, t)
        enc, body, v, nxt = feedback_step(residual, d, c)
        sent = decode_tensor(enc, body, n)
        assert np.array_equal(sent + nxt, v)  # exact in float32
        assert np.array_equal(v, d + (residual if residual is not None else 0))
        assert np.count_nonzero(sent) == 50 and np.all(nxt[sent != 0] == 0)
        sent_sum += sent
        true_sum += d
        residual = nxt
    err = np.abs(sent_sum + residual - true_sum).max()
    assert err <= 30 * np.finfo(np.float32).eps * np.abs(true_sum).max() * 4
    # and the memory does deliver: after 30 rounds most of the mass has been sent
    assert np.linalg.norm(sent_sum) > np.linalg.norm(residual)


def test_residual_file_survives_every_crash_point(tmp_path):
    """before/after/settled: the residual the next update starts from, at each crash point."""
    fb = ErrorFeedback(tmp_path)
    c = Compression("topk", fraction=0.1)
    n = 200
    u1 = Update("a" * 32, 1, "dev", "b" * 64, 1, 0.0, 0.0, "1" * 32, vec(n, 1))
    assert fb.current(n, None) is None
    p1 = fb.encode(u1, c, None)
    sent1 = Update.decode(p1, n).delta
    e1 = u1.delta - sent1
    # crash before the pending update was written: update 1 never existed -> zero residual
    assert np.array_equal(fb.current(n, None), np.zeros(n, np.float32))
    # pending update 1 durable -> e1
    assert np.array_equal(fb.current(n, p1), e1)
    fb.settle("1" * 32)
    assert np.array_equal(fb.current(n, None), e1)  # settled, pending deleted
    assert np.array_equal(fb.current(n, p1), e1)  # settled, crash before the pending was deleted
    # round 2 from e1; refused -> its sent values come back: residual = e1 + delta2
    u2 = Update("a" * 32, 2, "dev", "b" * 64, 1, 0.0, 0.0, "2" * 32, vec(n, 2))
    p2 = fb.encode(u2, c, None)
    fb.settle("2" * 32, refused_payload=p2)
    assert np.allclose(fb.current(n, None), e1 + u2.delta, atol=1e-7)
    once = fb.current(n, None).copy()
    fb.settle("2" * 32, refused_payload=p2)  # a second refusal of the re-sent update: no double refund
    assert np.array_equal(fb.current(n, None), once)
    assert fb.path.read_bytes()[8:40].decode() == SETTLED
    assert fb.current(n + 1, None) is None  # another model's size starts from zero
    # the aggregator switches to int8: what top-k held back goes out with the next delta
    u3 = Update("a" * 32, 3, "dev", "b" * 64, 1, 0.0, 0.0, "3" * 32, vec(n, 3))
    p3 = fb.encode(u3, Compression("none"), None)
    assert np.array_equal(Update.decode(p3, n).delta, u3.delta + once) and not fb.current(n, p3).any()
    fb.settle("3" * 32)
    u4 = Update("a" * 32, 4, "dev", "b" * 64, 1, 0.0, 0.0, "4" * 32, vec(n, 4))
    assert np.array_equal(Update.decode(fb.encode(u4, Compression("none"), None), n).delta, u4.delta)


# ------------------------------------------------------------------ parts


def big(n_bytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def test_split_and_reassemble_in_any_order():
    msg = big(300_000)
    limit = 80_000
    parts = split_message(msg, limit)
    assert len(parts) == 4 and all(len(p) <= limit for p in parts)
    assert split_message(msg, None) == [msg] and split_message(msg, 400_000) == [msg]
    r = Reassembler(max_total=1 << 20)
    order = [2, 0, 3, 0, 1]  # a repeat is harmless
    out = [r.feed("dev", parts[i], 0.0) for i in order]
    assert out[:-1] == [None] * 4 and out[-1] == msg and len(r) == 0


def bad_part(msg: bytes, limit: int, **change) -> bytes:
    size = part_capacity(limit)
    count = -(-len(msg) // size)
    p = dict(id=hashlib.sha256(msg).hexdigest(), index=0, count=count, total=len(msg), size=size, data=msg[:size])
    p.update(change)
    return Part(**p).encode()


def test_each_bad_part_is_refused_with_one_line():
    msg, limit = big(200_000), 70_000
    parts = split_message(msg, limit)
    size = part_capacity(limit)
    cases = {
        "oversized total": bad_part(msg, limit, total=2 << 20, count=-(-(2 << 20) // size)),
        "count disagrees": bad_part(msg, limit, count=9),
        "index out of range": bad_part(msg, limit, index=3),
        "short chunk": bad_part(msg, limit, data=msg[: size - 1]),
        "overlapping layout": bad_part(
            msg, limit, size=size - 1000, count=-(-len(msg) // (size - 1000)), data=msg[: size - 1000]
        ),
        "different content": bad_part(msg, limit, data=bytes(size)),
        "bad id": bad_part(msg, limit, id="zz"),
        "corrupted crc": parts[0][:-1] + bytes([parts[0][-1] ^ 1]),
        "truncated": parts[0][:-10],
    }
    for what, payload in cases.items():
        r = Reassembler(max_total=1 << 20)
        r.feed("dev", parts[0], 0.0)
        held = r.held_bytes
        with pytest.raises(ProtocolError) as e:
            r.feed("dev", payload, 0.0)
        assert "\n" not in e.value.reason, what
        assert r.held_bytes == held, what  # nothing kept from a refused part
        # the honest message still completes
        assert [r.feed("dev", p, 0.0) for p in parts[1:]][-1] == msg, what


def test_a_replaced_part_fails_the_whole_message_hash():
    msg, limit = big(150_000), 70_000
    parts = split_message(msg, limit)
    forged = bad_part(msg, limit, index=0, data=bytes(part_capacity(limit)))  # same layout, other bytes
    r = Reassembler(max_total=1 << 20)
    r.feed("dev", forged, 0.0)
    with pytest.raises(ProtocolError, match="sha256"):
        for p in parts[1:]:
            r.feed("dev", p, 0.0)
    assert len(r) == 0


def test_missing_parts_time_out_and_senders_are_bounded():
    msg, limit = big(150_000), 70_000
    parts = split_message(msg, limit)
    r = Reassembler(max_total=1 << 20, per_sender=2, max_partials=3, timeout=10.0)
    r.feed("dev", parts[0], 0.0)
    assert len(r) == 1 and r.expire(5.0) == 0 and r.expire(11.0) == 1 and len(r) == 0
    others = [split_message(big(150_000, s), limit)[0] for s in range(1, 4)]
    for p in others:  # three messages from one sender: only the newest two are kept
        r.feed("dev", p, 20.0)
    assert len(r) == 2
    r.feed("dev2", parts[0], 20.0)
    with pytest.raises(ProtocolError, match="too many"):
        r.feed("dev3", parts[0], 20.0)
    # memory never exceeds what was received
    assert r.held_bytes == 3 * part_capacity(limit)


def test_chunk_assembly_rules():
    a = ChunkAssembly(10, 4, 3)
    assert a.add(2, b"ab") and not a.add(2, b"ab")
    for index, data in [(3, b"abcd"), (0, b"abc"), (2, b"xy")]:
        with pytest.raises(ProtocolError):
            a.add(index, data)
    with pytest.raises(ProtocolError):
        a.assemble()
    with pytest.raises(ProtocolError):
        ChunkAssembly(10, 4, 2)

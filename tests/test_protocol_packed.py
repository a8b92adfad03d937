"""The packed UPDATE meta (header flag bit 1) and the gap-coded top-k body: round trips in both
meta forms, every hostile layout refused by the one parser with a one-line reason, every field
checked as its JSON form is, and the aggregator's validation taking both forms."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlearn.aggregator.model_store import ModelStore
from fleetlearn.aggregator.validation import Rejection, validate_update
from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Compression,
    Encoding,
    GlobalModel,
    Kind,
    Topics,
    Update,
    UpdateHeader,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
    peek_meta,
    read_header,
)
from fleetlearn.edge_runtime.core.protocol.frame import FLAG_PACKED_META, FLAG_SIGNED, PACKED_UPDATE, pack_update_meta

RUN = "a" * 32
NONCE = "0123456789abcdef" * 2
MODEL = "c" * 64
FIXED = PACKED_UPDATE.size  # 89


def update(**over) -> Update:
    fields = dict(
        run_id=RUN,
        round=3,
        device_id="dev-1",
        model_hash=MODEL,
        samples=10,
        train_loss=1.1,
        train_s=0.25,
        nonce=NONCE,
        delta=np.arange(4, dtype=np.float32),
    )
    return Update(**{**fields, **over})


def packed(run=RUN, rnd=3, model=MODEL, samples=10, loss=1.1, secs=0.25, nonce=NONCE, n=4, device=b"dev-1", id_len=None) -> bytes:
    """A packed meta built byte by byte (not by the encoder under test), any field any value."""
    head = PACKED_UPDATE.pack(
        bytes.fromhex(run),
        rnd,
        bytes.fromhex(model),
        samples,
        loss,
        secs,
        bytes.fromhex(nonce),
        n,
        len(device) if id_len is None else id_len,
    )
    return head + device


def frame(
    meta: bytes, body: bytes = b"", *, kind: int = 2, flags: int = FLAG_PACKED_META, meta_len=None, sig: bytes = b""
) -> bytes:
    header = HEADER.pack(
        MAGIC, 1, kind, 0, flags, len(meta) if meta_len is None else meta_len, len(body), zlib.crc32(body), len(sig), 0
    )
    return header + meta + body + sig


BODY = np.arange(4, dtype="<f4").tobytes()


# ------------------------------------------------------------------ round trips


def test_packed_and_json_meta_decode_to_the_same_update():
    u = update()
    small, big = u.encode(), u.encode(packed=False)
    h = read_header(small)
    assert h.flags == FLAG_PACKED_META and h.meta_len == FIXED + len("dev-1") and h.packed_meta
    assert read_header(big).flags == 0 and not read_header(big).packed_meta
    assert len(big) - len(small) > 150  # ~290 bytes of JSON against 94
    a, b = Update.decode(small, 4), Update.decode(big, 4)
    for back in (a, b):
        assert (back.run_id, back.round, back.device_id, back.model_hash, back.samples, back.nonce) == (
            RUN,
            3,
            "dev-1",
            MODEL,
            10,
            NONCE,
        )
        assert back.train_loss == 1.1  # f64: bit for bit, as through JSON
        assert np.array_equal(back.delta, u.delta)
    assert a.train_s == float(np.float32(0.25)) and math.isclose(a.train_s, 0.25, rel_tol=1e-7)
    # both forms peek to the same dict (the one unpacker gives JSON's keys and types)
    assert peek_meta(small, Kind.UPDATE) == peek_meta(big, Kind.UPDATE)
    assert UpdateHeader.peek(small) == UpdateHeader(RUN, 3, "dev-1", NONCE, len(small))
    assert UpdateHeader.peek(small, verify_body=True) == UpdateHeader.peek(small)
    # the longest device id and extreme values that fit
    edge = update(device_id="x" * 64, round=2**31 - 1, samples=2**31 - 1, train_loss=-1e300, train_s=0.0)
    back = Update.decode(edge.encode(), 4)
    assert (back.device_id, back.round, back.samples, back.train_loss, back.train_s) == (
        "x" * 64,
        2**31 - 1,
        2**31 - 1,
        -1e300,
        0.0,
    )


def test_a_signature_covers_the_packed_meta_and_its_flag():
    signed = update().encode(sign=lambda b: zlib.crc32(b).to_bytes(4, "little") * 16)
    h = read_header(signed)
    assert h.flags == FLAG_SIGNED | FLAG_PACKED_META
    got = Update.decode(signed, 4)
    assert got.signed_part == signed[:-64] and got.signature == zlib.crc32(got.signed_part).to_bytes(4, "little") * 16
    assert got.signed_part[HEADER_SIZE : HEADER_SIZE + h.meta_len] == pack_update_meta(peek_meta(signed))
    assert got.signed_part[7] == FLAG_SIGNED | FLAG_PACKED_META  # the flag byte is signed too


def test_the_encoder_refuses_what_the_layout_cannot_carry():
    for over, field in [
        (dict(run_id="A" * 32), "run_id"),  # upper case: JSON readers refuse it, so the packer does too
        (dict(nonce="e" * 31), "nonce"),
        (dict(model_hash="c" * 63 + " "), "model_hash"),
        (dict(device_id="x" * 65), "device_id"),
        (dict(device_id="dév"), "device_id"),
        (dict(round=2**32), "round"),
        (dict(samples=-1), "samples"),
        (dict(train_loss=math.nan), "train_loss"),
        (dict(train_s=math.inf), "train_s"),
        (dict(train_s=1e39), "train_s"),  # beyond float32
        (dict(train_s=-0.5), "train_s"),
    ]:
        with pytest.raises(ProtocolError, match=field) as exc:
            update(**over).encode()
        assert "\n" not in exc.value.reason
    with pytest.raises(ProtocolError, match="only UPDATE"):
        encode_frame(Kind.GLOBAL, {}, b"", packed=True)


# ------------------------------------------------------------------ hostile layouts


@pytest.mark.parametrize(
    "payload, reason",
    [
        (frame(packed()[:FIXED], BODY), "packed meta length 89 is outside"),  # no device id at all
        (frame(packed(device=b"x" * 65), BODY), "packed meta length 154 is outside"),
        (frame(packed(id_len=4), BODY), "94 bytes, 93 expected for a 4-byte device id"),
        (frame(packed(id_len=6), BODY), "94 bytes, 95 expected for a 6-byte device id"),
        (frame(packed(id_len=255), BODY), "expected for a 255-byte device id"),
        (frame(packed(), BODY, kind=1), "packed-meta flag on a frame of kind 1"),
        (frame(packed(), BODY, kind=4), "packed-meta flag on a frame of kind 4"),
        (frame(packed(), BODY, flags=0x04 | FLAG_PACKED_META), "unknown flags 0x06"),
        (frame(packed(), BODY, flags=0), "meta is not valid UTF-8 JSON"),  # packed bytes without the flag
        (frame(packed())[: HEADER_SIZE + 50], "too short for its 94-byte meta|header says 118"),
    ],
    ids=lambda v: "" if isinstance(v, bytes) else v.split(" ")[0],
)
def test_hostile_packed_layouts_are_refused_by_the_one_parser(payload, reason):
    for read in (peek_meta, lambda p: decode_frame(p, Kind.UPDATE, max_body=1 << 20), UpdateHeader.peek):
        with pytest.raises(ProtocolError, match=reason) as exc:
            read(payload)
        assert "\n" not in exc.value.reason


def test_json_meta_under_the_packed_flag_is_refused():
    doc = json.dumps(peek_meta(update().encode(packed=False)), separators=(",", ":")).encode()
    with pytest.raises(ProtocolError, match="packed meta length"):
        peek_meta(frame(doc, BODY))  # ~290 bytes: over the packed bound
    short = b'{"run_id":"' + b"a" * (FIXED - 12) + b'"}'  # 89 < len <= 153: passes the header bound
    with pytest.raises(ProtocolError, match="expected for a"):
        peek_meta(frame(short, BODY))


@pytest.mark.parametrize(
    "meta, field",
    [
        (packed(rnd=0), "round"),
        (packed(rnd=2**31), "round"),
        (packed(samples=0), "samples"),
        (packed(samples=2**31), "samples"),
        (packed(n=5), "'n'"),
        (packed(n=0), "'n'"),
        (packed(loss=math.nan), "train_loss"),
        (packed(loss=-math.inf), "train_loss"),
        (packed(secs=math.nan), "train_s"),
        (packed(secs=math.inf), "train_s"),
        (packed(secs=-1.0), "train_s"),
        (packed(device=b"dev/1"), "device_id"),
        (packed(device=b"-dev"), "device_id"),
        (packed(device=b"d\xc3\xa9v"), "device_id"),  # valid UTF-8, not NAME_RE
        (packed(device=b"\xff\xfe"), "device_id"),  # not UTF-8
        (packed(device=b"dev\x00"), "device_id"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_packed_fields_are_checked_as_their_json_form(meta, field):
    with pytest.raises(ProtocolError, match=field) as exc:
        Update.decode(frame(meta, BODY), 4)
    assert "\n" not in exc.value.reason


def test_update_header_keeps_what_is_readable_in_a_packed_meta():
    peek = UpdateHeader.peek(frame(packed(rnd=0, device=b"\xff\xfe"), BODY))
    assert (peek.run_id, peek.round, peek.device_id, peek.nonce) == (RUN, None, None, NONCE)
    with pytest.raises(ProtocolError, match="'device_id' is missing or malformed"):
        peek.require("run_id", "device_id")
    with pytest.raises(ProtocolError, match="UPDATE"):
        UpdateHeader.peek(GlobalModel(RUN, 1, MODEL, np.zeros(2, np.float32)).encode())


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, HEADER_SIZE + FIXED + 5 + 16 - 1), value=st.integers(0, 255), cut=st.integers(0, 8))
def test_any_mutated_packed_frame_decodes_or_refuses_in_one_line(pos, value, cut):
    good = bytearray(update().encode())
    good[pos] = value
    payload = bytes(good[: len(good) - cut])
    for read in (lambda p: Update.decode(p, 4), UpdateHeader.peek, peek_meta):
        try:
            read(payload)
        except ProtocolError as exc:
            assert "\n" not in exc.reason and exc.reason


# ------------------------------------------------------------------ the aggregator takes both forms


def test_validation_accepts_packed_and_json_updates_alike(tmp_path):
    n = 7
    store = ModelStore.open(tmp_path / "state", MODEL, n, lambda: np.arange(n, dtype=np.float32))
    topics = Topics("unit")
    for i, form in enumerate((True, False)):
        u = update(run_id=store.run_id, round=store.open_round, nonce=f"{i}" * 32, delta=np.full(n, 0.5, np.float32))
        v = validate_update(
            topics.update("dev-1"), u.encode(packed=form), topics=topics, num_params=n, version=store, accepted={}
        )
        assert v.update.nonce == u.nonce and v.update.samples == 10
    bad = frame(packed(run=store.run_id, rnd=store.open_round, n=n, device=b"\xff"), np.zeros(n, "<f4").tobytes())
    with pytest.raises(Rejection, match="device_id") as info:
        validate_update(topics.update("dev-1"), bad, topics=topics, num_params=n, version=store, accepted={})
    assert (info.value.round, info.value.nonce) == (store.open_round, NONCE)  # the ack still names them


# ------------------------------------------------------------------ top-k with 16-bit gaps


def test_topk_sends_16_bit_gaps_and_falls_back_to_32_bit_indices():
    c = Compression.parse("topk:0.01")
    x = np.zeros(1657, np.float32)
    x[[0, 5, 1656]] = [3.0, -2.0, 1.0]
    enc, body = encode_tensor(x, c)
    assert enc == Encoding.TOPK_GAP16 == c.encoding and len(body) == 4 + 6 * 17
    assert np.array_equal(decode_tensor(enc, body, 1657)[[0, 5, 1656]], x[[0, 5, 1656]])
    # two kept values 100,000 apart: no 16-bit gap can say it, the body is TOPK (u32 indices)
    big = np.zeros(200_000, np.float32)
    big[[7, 100_007]] = [1.0, 2.0]
    enc, body = encode_tensor(big, Compression("topk", fraction=1.5 / big.size))  # k = 2
    assert enc == Encoding.TOPK and len(body) == 4 + 8 * 2
    assert np.array_equal(np.nonzero(decode_tensor(enc, body, big.size))[0], [7, 100_007])
    # a gap of exactly 65,535 still fits
    edge = np.zeros(70_000, np.float32)
    edge[[1, 65_536]] = 1.0
    enc, body = encode_tensor(edge, Compression("topk", fraction=1.5 / edge.size))
    assert enc == Encoding.TOPK_GAP16 and np.array_equal(np.nonzero(decode_tensor(enc, body, edge.size))[0], [1, 65_536])


def gap16(gaps, values) -> bytes:
    return struct.pack("<I", len(gaps)) + np.array(gaps, "<u2").tobytes() + np.array(values, "<f4").tobytes()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "too short"),
        (gap16([], []), "count 0"),
        (gap16([1] * 51, [1.0] * 51), "count 51"),
        (gap16([1, 2], [1.0, 1.0])[:-1], "expected for k=2"),
        (gap16([1, 2], [1.0, 1.0]) + b"\0", "expected for k=2"),
        (struct.pack("<I", 3) + gap16([1, 2], [1.0, 1.0])[4:], "expected for k=3"),
        (gap16([5, 0], [1.0, 1.0]), "gaps after the first must be >= 1"),
        (gap16([100], [1.0]), "index 100 is out of range"),
        (gap16([60, 40], [1.0, 1.0]), "index 100 is out of range"),
        (gap16([65535, 65535], [1.0, 1.0]), "index 131070 is out of range"),
        (gap16([3], [math.nan]), "NaN/Inf"),
        (gap16([3, 1], [1.0, -math.inf]), "NaN/Inf"),
    ],
)
def test_hostile_gap16_bodies_are_refused_with_one_line(body, reason):
    with pytest.raises(ProtocolError, match=reason) as exc:
        decode_tensor(Encoding.TOPK_GAP16, body, 100)
    assert "\n" not in exc.value.reason


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400), n=st.integers(1, 150))
def test_random_gap16_bodies_decode_to_finite_or_refuse(body, n):
    try:
        y = decode_tensor(Encoding.TOPK_GAP16, body, n)
    except ProtocolError as exc:
        assert "\n" not in exc.reason
        return
    assert y.shape == (n,) and np.isfinite(y).all() and np.count_nonzero(y) <= -(-n // 2)

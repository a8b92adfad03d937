"""The wire protocol's own units: the one header parser (read_header, peek_meta, UpdateHeader),
the typed round-metrics message, and the topic tree the broker ACL is derived from."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_SIG_BYTES,
    GlobalModel,
    Kind,
    RoundMetrics,
    Topics,
    Update,
    UpdateHeader,
    decode_frame,
    encode_json,
    max_frame_bytes,
    peek_meta,
    read_header,
)

RUN = "a" * 32
NONCE = "e" * 32
MODEL = "c" * 64


def update(**over) -> Update:
    fields = dict(
        run_id=RUN,
        round=3,
        device_id="dev-1",
        model_hash=MODEL,
        samples=10,
        train_loss=1.5,
        train_s=0.1,
        nonce=NONCE,
        delta=np.arange(4, dtype=np.float32),
    )
    return Update(**{**fields, **over})


def frame(
    meta: bytes,
    body: bytes = b"",
    *,
    kind: int = 2,
    version: int = 1,
    flags: int = 0,
    sig: bytes = b"",
    meta_len: int | None = None,
    reserved: int = 0,
) -> bytes:
    header = HEADER.pack(
        MAGIC,
        version,
        kind,
        0,
        flags,
        len(meta) if meta_len is None else meta_len,
        len(body),
        zlib.crc32(body),
        len(sig),
        reserved,
    )
    return header + meta + body + sig


# ---------------------------------------------------------------- the header peek


def test_read_header_describes_the_frame_exactly():
    payload = update().encode()
    h = read_header(payload)
    assert h.kind == Kind.UPDATE and h.total == len(payload) and h.body_len == 16 and h.sig_len == 0
    assert h.crc32 == zlib.crc32(payload[h.meta_end : h.meta_end + 16])
    signed = update().encode(sign=lambda b: b"s" * 64)
    assert read_header(signed).sig_len == 64 and read_header(signed).total == len(signed)
    assert (
        max_frame_bytes(16) == HEADER_SIZE + MAX_META_BYTES + 16 + MAX_SIG_BYTES
        and max_frame_bytes(16, signed=False) == HEADER_SIZE + MAX_META_BYTES + 16
    )


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "truncated frame"),
        (b"FLRN" + b"\0" * 10, "truncated frame"),
        (b"XXXX" + b"\0" * 20, "bad magic"),
        (frame(b"{}", version=2), "wire version 2"),
        (frame(b"{}", kind=9), "unknown frame kind 9"),
        (frame(b"{}", flags=0x80), "unknown flags"),
        (frame(b"{}", reserved=1), "reserved bits"),
        (frame(b"{}", meta_len=MAX_META_BYTES + 1), "meta length"),
        (frame(b"{}", flags=1), "disagrees with the signed flag"),
        (frame(b"{}", sig=b"x" * 64), "disagrees with the signed flag"),
    ],
)
def test_read_header_refuses_hostile_headers_with_one_line(payload, reason):
    with pytest.raises(ProtocolError, match=reason) as exc:
        read_header(payload)
    assert "\n" not in exc.value.reason


def test_peek_meta_reads_the_meta_without_the_body():
    payload = update().encode()
    assert peek_meta(payload, Kind.UPDATE)["nonce"] == NONCE
    # The body is neither bounded nor checked: a corrupted body still peeks (decode refuses it).
    corrupt = payload[:-1] + bytes([payload[-1] ^ 1])
    assert peek_meta(corrupt)["round"] == 3
    with pytest.raises(ProtocolError, match="crc32"):
        decode_frame(corrupt, Kind.UPDATE, max_body=16)
    with pytest.raises(ProtocolError, match="GLOBAL"):
        peek_meta(payload, Kind.GLOBAL)
    with pytest.raises(ProtocolError, match="too short for its"):
        peek_meta(payload[: HEADER_SIZE + 5])
    for meta in (b"[1]", b"\xff\xfe", b'{"a": NaN}', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(ProtocolError, match="meta"):
            peek_meta(frame(meta))


def test_update_header_peek_keeps_what_is_readable():
    payload = update().encode()
    assert UpdateHeader.peek(payload) == UpdateHeader(RUN, 3, "dev-1", NONCE, len(payload))
    assert UpdateHeader.peek(payload, verify_body=True) == UpdateHeader.peek(payload)
    # Each field on its own: a malformed round leaves the nonce readable (the ack still names it).
    meta = {"run_id": RUN, "round": "three", "device_id": "dev/1", "nonce": NONCE}
    peek = UpdateHeader.peek(frame(json.dumps(meta).encode()))
    assert (peek.run_id, peek.round, peek.device_id, peek.nonce) == (RUN, None, None, NONCE)
    with pytest.raises(ProtocolError, match="'round' is missing or malformed"):
        peek.require("run_id", "round")
    for bad_round in (0, -1, 2**31, True, 1.5, None):
        assert UpdateHeader.peek(frame(json.dumps({"round": bad_round}).encode())).round is None
    # verify_body: the length and crc must hold; a body for a model of any size is read.
    big = update(delta=np.ones(10_000, np.float32)).encode()
    assert UpdateHeader.peek(big, verify_body=True).size == len(big)
    for broken in (big[:-1], big + b"\0", big[:-1] + b"\x01"):
        with pytest.raises(ProtocolError):
            UpdateHeader.peek(broken, verify_body=True)
    with pytest.raises(ProtocolError, match="GLOBAL|UPDATE"):
        UpdateHeader.peek(GlobalModel(RUN, 1, MODEL, np.zeros(2, np.float32)).encode())


# ---------------------------------------------------------------- round metrics


def full_metrics() -> RoundMetrics:
    return RoundMetrics(
        round=4,
        run_id=RUN,
        devices=("dev-0", "dev-1"),
        devices_truncated=False,
        accepted=2,
        invited=("dev-0", "dev-1", "dev-2"),
        invited_truncated=False,
        connected=5,
        update_norm=0.6,
        samples=40,
        train_loss=0.5,
        test_mse=3.25,
        test_accuracy=0.5,
        test_loss=3.25,
        eval_s=0.01,
        wall_s=1.5,
        bytes_in=1000,
        bytes_out=2000,
        global_bytes=900,
        deadline_extensions=1,
        rejected=1,
        rejected_devices=("dev-9",),
        closed_by="target",
        strategy="dp-fedavg",
        proximal_mu=0.01,
        opened_at=1.0,
        closed_at=2.5,
        clip_norm=0.5,
        clipped=1,
        update_norm_median=0.4,
        update_norm_max=0.9,
        trim_fraction=0.1,
        trimmed=0,
        epsilon=1.2,
        delta=1e-5,
        noise_multiplier=1.0,
        dp_sampling_rate=1.0,
        dp_expected_participants=2.0,
        dp_accountant="rdp",
        extra={"model_hash": MODEL, "test_mae": 1.0},
    )


def test_round_metrics_round_trip():
    m = full_metrics()
    assert RoundMetrics.decode(m.encode()) == m
    assert RoundMetrics.from_doc(json.loads(json.dumps(m.to_doc()))) == m
    doc = m.to_doc()
    assert list(doc)[:3] == ["round", "run_id", "devices"] and list(doc)[-2:] == ["model_hash", "test_mae"]
    assert json.loads(m.encode())["v"] == 1 and "v" not in doc
    assert (m.test_metric, m.test_value) == ("test_mse", 3.25)
    # Not reported = left out; JSON null (a value the aggregator could not write) reads as not reported.
    small = RoundMetrics(round=1, run_id=RUN, devices=("d",))
    assert small.to_doc() == {"round": 1, "run_id": RUN, "devices": ["d"]}
    assert RoundMetrics.from_doc({"round": 1, "test_mse": None, "epsilon": None}) == RoundMetrics(round=1)
    # The headline test metric: preference order, then any other finite test_* field.
    assert RoundMetrics.from_doc({"round": 1, "test_accuracy": 0.9, "test_loss": 0.3}).test_metric == "test_accuracy"
    assert RoundMetrics.from_doc({"round": 1, "test_f1": 0.7, "test_zz": "x"}).test_value == 0.7


def test_every_declared_field_survives_the_round_trip():
    """A field added to RoundMetrics is encoded and decoded without further edits."""
    from dataclasses import fields

    m = full_metrics()
    declared = {f.name for f in fields(RoundMetrics)} - {"extra"}
    assert declared <= set(m.to_doc()), "full_metrics() must set every field: add the new one there"


def test_round_metrics_metrics_message_cuts_the_device_list_to_fit():
    devices = tuple(f"device-{i:05d}" for i in range(8000))
    m = RoundMetrics(round=1, run_id=RUN, devices=devices, samples=8000)
    payload = m.encode()
    assert len(payload) <= MAX_JSON_BYTES
    back = RoundMetrics.decode(payload)
    assert back.devices_truncated and 0 < len(back.devices) < len(devices) and back.devices == devices[: len(back.devices)]
    assert m.to_doc()["devices"] == list(devices)  # rounds.jsonl keeps the whole list


@pytest.mark.parametrize(
    "doc, field",
    [
        ({"devices": []}, "round"),
        ({"round": "three"}, "round"),
        ({"round": -1}, "round"),
        ({"round": 2**31}, "round"),
        ({"round": True}, "round"),
        ({"round": 1, "run_id": "xyz"}, "run_id"),
        ({"round": 1, "samples": -5}, "samples"),
        ({"round": 1, "samples": 1.5}, "samples"),
        ({"round": 1, "train_loss": "low"}, "train_loss"),
        ({"round": 1, "wall_s": 10**400}, "wall_s"),
        ({"round": 1, "devices": "dev-0"}, "devices"),
        ({"round": 1, "devices": ["dev/0"]}, "devices"),
        ({"round": 1, "devices": [{"device_id": 7}]}, "devices"),
        ({"round": 1, "closed_by": "x" * 500}, "closed_by"),
        ({"round": 1, "strategy": "fed\navg"}, "strategy"),
        ({"round": 1, "devices_truncated": 1}, "devices_truncated"),
        ({"round": 1, "rejected": ["ok", "no/t"]}, "rejected"),
    ],
)
def test_round_metrics_refuse_hostile_fields_with_one_line(doc, field):
    with pytest.raises(ProtocolError) as exc:
        RoundMetrics.decode(encode_json(doc))
    assert f"'{field}'" in exc.value.reason and exc.value.reason.startswith("metrics:") and "\n" not in exc.value.reason


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"[]", "not a JSON object"),
        (b'{"round": 1}', "wire version"),
        (b'{"v": 1, "round": 1, "train_loss": NaN}', "not valid UTF-8 JSON"),
        (b"\xff", "not valid UTF-8 JSON"),
        (b"[" * 100_000, "exceeds"),
        (encode_json({"round": 1, "pad": "x" * MAX_JSON_BYTES}), "exceeds"),
    ],
)
def test_round_metrics_refuse_hostile_payloads(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        RoundMetrics.decode(payload)


def test_rejected_devices_may_be_named():
    m = RoundMetrics.from_doc({"round": 1, "rejected": [{"device_id": "b", "reason": "stale"}, "c"]})
    assert m.rejected == 2 and m.rejected_devices == ("b", "c")
    assert RoundMetrics.from_doc(m.to_doc()) == m


# ---------------------------------------------------------------- topics


def test_topic_names_and_device_of():
    t = Topics("fleet-1")
    assert t.update("d") == "fleetlearn/fleet-1/update/d" and t.device_of(t.ack("d"), "ack") == "d"
    for bad in ("a/b", "+", "#", "", "x" * 65, "-lead"):
        with pytest.raises(ProtocolError):
            Topics(bad)
    with pytest.raises(ProtocolError):
        t.device_of("fleetlearn/fleet-1/ack/a/b", "ack")
    with pytest.raises(ProtocolError):
        t.grants("device")  # a device's grants name its own topics
    assert struct.calcsize("<4sBBBBIIIHH") == HEADER_SIZE


def test_update_norms_are_non_negative_numbers():
    for key in ("update_norm", "update_norm_max"):
        for bad in (-0.1, "1", True, [1.0], -1):
            with pytest.raises(ProtocolError, match=key):
                RoundMetrics.from_doc({"round": 1, key: bad})
    m = RoundMetrics.from_doc({"round": 1, "update_norm": 0.5, "update_norm_max": 2})
    assert (m.update_norm, m.update_norm_max) == (0.5, 2.0) and RoundMetrics.decode(m.encode()) == m


def test_a_large_cohort_is_cut_from_the_metrics_message_not_from_the_log_record():
    invited = tuple(f"device-{i:05d}-" + "x" * 40 for i in range(3000))
    m = RoundMetrics(round=2, run_id=RUN, devices=invited[:5], invited=invited, connected=5000)
    payload = m.encode()
    back = RoundMetrics.decode(payload)
    assert len(payload) <= 64 * 1024 and back.invited_truncated and 0 < len(back.invited) < 3000
    assert back.devices == invited[:5] and not back.devices_truncated and back.connected == 5000
    assert RoundMetrics.from_doc(json.loads(json.dumps(m.to_doc()))).invited == invited  # rounds.jsonl keeps all


def test_status_engine_and_arch_round_trip_and_hostile_values_are_refused():
    from fleetlearn.edge_runtime.core.protocol import Status

    s = Status("pi-01", "training", 3, engine="portable", arch="aarch64")
    assert Status.decode(s.encode()) == s
    assert Status.decode(Status("pi-01", "idle").encode()).engine is None  # before a bundle is loaded
    for field, value in (("engine", "cuda-magic"), ("engine", 7), ("arch", "arm/../x"), ("arch", "a" * 33), ("arch", 64)):
        doc = json.loads(s.encode())
        doc[field] = value
        with pytest.raises(ProtocolError, match=field):
            Status.decode(json.dumps(doc).encode())

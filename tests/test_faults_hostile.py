"""Hostile update payloads against a real aggregator on a real mosquitto, generated with
Hypothesis: >= 1,000 mutations of a valid UPDATE frame (truncated, padded, oversized, wrong
length, NaN/Inf bodies, header fields that lie, meta fields of the wrong type or value, JSON
that is not an object or nests too deep, non-UTF-8, frames of another kind, replays on other
devices' topics, second updates, invalid topic names) plus fully random binaries, published
during one open round. Every one must cost exactly one `event=update_rejected` log line (and
one negative ack when the topic names a valid device), the aggregator must stay up, and the
round's result must be bit-identical to a clean run of the same honest updates.

How the payloads are generated: a `@given` function with `max_examples` that only appends the
drawn example to a list (`collect_hostile`). That is Hypothesis' own generation loop (its
distribution, its bias toward boundary values), run in the generate phase only, with no example
database and a fixed seed (FLEETLEARN_FAULTS_SEED overrides it, e.g. in a nightly job), so a
failure reproduces. `strategy.example()` is meant for the REPL, and one huge `st.lists(...,
min_size=1000)` example would overrun Hypothesis' per-example choice budget. Large random
payloads are drawn as (size, seed) and expanded, for the same reason.

Every strategy below is built to be invalid *by construction* (a frame that would validate,
e.g. a well-formed update from an unknown device, is never produced): otherwise "rejected"
would not be the right expectation.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import secrets
import time
import zlib
from dataclasses import dataclass
from functools import partial

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import (
    HEADER,
    HEADER_SIZE,
    HEX32_RE,
    MAGIC,
    MAX_META_BYTES,
    NAME_RE,
    Ack,
    GlobalModel,
    RoundState,
    Status,
    Topics,
    Update,
    encode_chunk,
)
from fleetlearn.edge_runtime.core.protocol.frame import FLAG_PACKED_META, PACKED_UPDATE
from tests.peers import Recorder
from tests.test_faults import AggProc, agg_args, agg_events, fedavg, procs, rounds_log, state_weights  # noqa: F401  (procs: fixture)

N_HOSTILE = 1500  # examples drawn; >= 1,000 distinct after de-duplication (about 1,200)
SEED = int(os.environ.get("FLEETLEARN_FAULTS_SEED", "20250611"))
HONEST = ("dev-a", "dev-b", "dev-c")
SAMPLES = (11, 40, 153)
LOSSES = (3.0, 2.0, 1.0)

# Topic levels. `+` matches an empty level too, so "" reaches the aggregator. No control
# characters: mosquitto drops a client that publishes them (a broker rule, not our code's).
VALID_TOPIC_DEVICES = ("mallory", "eve.2", "Z", "x" * 64, *HONEST)
INVALID_TOPIC_DEVICES = ("", "-lead", "_under", ".dot", "x" * 65, "has space", "dév", "a$b", "semi;colon", "quote'", "star*")

INT_FIELDS = ("round", "samples", "n")
STR_FIELDS = ("run_id", "device_id", "model_hash", "nonce")
FLOAT_FIELDS = ("train_loss", "train_s")
ALL_FIELDS = INT_FIELDS + STR_FIELDS + FLOAT_FIELDS
RAW = "__raw_json_token__"  # replaced by a raw JSON token (NaN, 1e999, a 400-digit integer...)


@dataclass(frozen=True)
class Ctx:
    run_id: str
    model_hash: str
    n: int
    round: int
    honest_frames: dict  # device -> the accepted frame (already counted this round)
    honest_nonces: frozenset

    @property
    def bound(self) -> int:
        return HEADER_SIZE + MAX_META_BYTES + 4 * self.n + 512


@dataclass(frozen=True)
class Hostile:
    label: str
    device: str  # the topic's last level
    payload: bytes


# ------------------------------------------------------------------------------ building blocks


def frame(meta: bytes, body: bytes, sig: bytes = b"", **header) -> bytes:
    """An UPDATE frame with consistent header fields, except those given in `header`."""
    h = dict(
        magic=MAGIC,
        version=1,
        kind=2,
        encoding=0,
        flags=0,
        meta_len=len(meta),
        body_len=len(body),
        crc=zlib.crc32(body),
        sig_len=len(sig),
        reserved=0,
    )
    h.update(header)
    return (
        HEADER.pack(
            h["magic"],
            h["version"],
            h["kind"],
            h["encoding"],
            h["flags"],
            h["meta_len"],
            h["body_len"],
            h["crc"],
            h["sig_len"],
            h["reserved"],
        )
        + meta
        + body
        + sig
    )


def meta_doc(ctx: Ctx, device: str, nonce: str, **over) -> dict:
    doc = {
        "run_id": ctx.run_id,
        "round": ctx.round,
        "device_id": device,
        "model_hash": ctx.model_hash,
        "samples": 10,
        "train_loss": 1.0,
        "train_s": 0.1,
        "nonce": nonce,
        "n": ctx.n,
    }
    doc.update(over)
    return doc


def dump(doc, raw: str | None = None) -> bytes:
    text = json.dumps(doc, separators=(",", ":"))
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    return text.encode()


def body_of(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


hex32 = st.binary(min_size=16, max_size=16).map(bytes.hex)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12
)
not_int = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.booleans()
    | st.none()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)
not_str = (
    st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
    | st.lists(st.text(max_size=3), max_size=3)
)
not_number = (
    st.text(max_size=20)
    | st.booleans()
    | st.none()
    | st.lists(st.floats(allow_nan=False), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)
# Tokens Python's json reads but the protocol must refuse: NaN/Infinity (parse_constant), 1e999
# (parses to inf), integers too large for a float (OverflowError in math.isfinite).
bad_number_tokens = (
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
    | st.integers(309, 4200).map(lambda k: "9" * k)
    | st.integers(309, 4200).map(lambda k: "-" + "9" * k)
)


@st.composite
def hostile_update(draw, ctx: Ctx) -> Hostile:
    label = draw(st.sampled_from(sorted(MUTATIONS)))
    return MUTATIONS[label](draw, ctx)


def _topic_device(draw, valid_only: bool = False) -> str:
    if valid_only or draw(st.integers(0, 9)) < 8:
        return draw(st.sampled_from(VALID_TOPIC_DEVICES))
    return draw(st.sampled_from(INVALID_TOPIC_DEVICES))


def _meta_device(device: str) -> str:
    return device if NAME_RE.fullmatch(device) else "mallory"


def _nonce(draw, ctx: Ctx) -> str:
    return draw(hex32.filter(lambda h: h not in ctx.honest_nonces))


def _delta(draw, ctx: Ctx, size: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.normal(0, 0.01, ctx.n if size is None else size).astype(np.float32)


def _valid_parts(draw, ctx: Ctx, device: str) -> tuple[dict, bytes]:
    """The meta and body of an update that would validate, were it not for what the caller breaks."""
    return meta_doc(ctx, _meta_device(device), _nonce(draw, ctx)), body_of(_delta(draw, ctx))


# ------------------------------------------------------------------------------ mutations
# Each takes (draw, ctx) and returns a Hostile that cannot validate, whatever was drawn.


def m_random_small(draw, ctx):
    return Hostile("random_small", _topic_device(draw), draw(st.binary(max_size=600)))


def m_random_large(draw, ctx):
    size = draw(st.integers(600, 2 * ctx.bound))
    return Hostile("random_large", _topic_device(draw), random.Random(draw(st.integers(0, 2**32))).randbytes(size))


def m_random_after_header(draw, ctx):
    """A plausible header (magic, version, kind) and random everything after it."""
    size = draw(st.integers(0, ctx.bound))
    tail = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    return Hostile("random_after_header", _topic_device(draw), MAGIC + bytes([1, 2]) + tail)


def m_truncated(draw, ctx):
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    good = frame(dump(meta), body)
    return Hostile("truncated", device, good[: draw(st.integers(0, len(good) - 1))])


def m_padded(draw, ctx):
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    return Hostile("padded", device, frame(dump(meta), body) + draw(st.binary(min_size=1, max_size=64)))


def m_oversized(draw, ctx):
    """Consistent header and meta, a body far over the model's size: over the byte bound."""
    device = _topic_device(draw)
    meta, _ = _valid_parts(draw, ctx, device)
    meta_b = dump(dict(meta, n=ctx.n * 3))
    over = (ctx.bound - HEADER_SIZE - len(meta_b)) // 4 + 1
    count = draw(st.integers(over, over + 2 * ctx.n))
    return Hostile("oversized", device, frame(dump(dict(meta, n=count)), body_of(np.zeros(count, np.float32))))


def m_body_length(draw, ctx):
    device = _topic_device(draw)
    meta, _ = _valid_parts(draw, ctx, device)
    k = draw(st.integers(-(ctx.n - 1), 200).filter(lambda v: v != 0))
    size = ctx.n + k
    claimed = draw(st.sampled_from([ctx.n, size]))
    return Hostile("body_length", device, frame(dump(dict(meta, n=claimed)), body_of(_delta(draw, ctx, size))))


def m_body_nonfinite(draw, ctx):
    device = _topic_device(draw)
    meta, _ = _valid_parts(draw, ctx, device)
    delta = _delta(draw, ctx)
    bits = delta.view("<u4")
    for i in draw(st.lists(st.integers(0, ctx.n - 1), min_size=1, max_size=5)):
        # exponent all ones: +-inf (mantissa 0) or a NaN (quiet or signalling, any payload)
        bits[i] = (draw(st.integers(0, 1)) << 31) | 0x7F800000 | draw(st.integers(0, 2**23 - 1) | st.just(0))
    return Hostile("body_nonfinite", device, frame(dump(meta), delta.tobytes()))


HEADER_LIES = {
    "magic": st.binary(min_size=4, max_size=4).filter(lambda b: b != MAGIC),
    "version": st.integers(0, 255).filter(lambda v: v != 1),
    "kind": st.integers(0, 255).filter(lambda v: v != 2),
    "encoding": st.integers(1, 255),
    "flags": st.integers(1, 255),
    "meta_len": st.integers(0, 2**32 - 1),
    "body_len": st.integers(0, 2**32 - 1),
    "crc": st.integers(0, 2**32 - 1),
    "sig_len": st.integers(1, 2**16 - 1),
    "reserved": st.integers(1, 2**16 - 1),
}


def m_header_lie(draw, ctx, field):
    """One header field that disagrees with the frame (or with the protocol)."""
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    meta_b = dump(meta)
    truth = {"meta_len": len(meta_b), "body_len": len(body), "crc": zlib.crc32(body)}
    value = draw(HEADER_LIES[field].filter(lambda v: v != truth.get(field)))
    return Hostile(f"header_{field}", device, frame(meta_b, body, **{field: value}))


def m_meta_wrong_type(draw, ctx):
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    field = draw(st.sampled_from(ALL_FIELDS))
    bad = not_int if field in INT_FIELDS else not_str if field in STR_FIELDS else not_number
    return Hostile("meta_wrong_type", device, frame(dump(dict(meta, **{field: draw(bad)})), body))


def m_meta_missing(draw, ctx):
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    for field in draw(st.sets(st.sampled_from(ALL_FIELDS), min_size=1)):
        del meta[field]
    return Hostile("meta_missing", device, frame(dump(meta), body))


def m_meta_bad_value(draw, ctx, field):
    """Right type, wrong value: another run/model/round, a device id that is not the topic's,
    samples <= 0 or huge, a wrong n, a malformed nonce, a negative time, a non-finite loss."""
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    raw = None
    if field == "run_id":
        value = draw(hex32.filter(lambda h: h != ctx.run_id) | st.text(max_size=40).filter(lambda s: not HEX32_RE.fullmatch(s)))
    elif field == "model_hash":
        value = draw(hex64.filter(lambda h: h != ctx.model_hash) | st.text(max_size=70))
    elif field == "round":
        value = draw(st.integers().filter(lambda r: r != ctx.round))
    elif field == "device_id":
        value = draw(
            st.sampled_from(VALID_TOPIC_DEVICES).filter(lambda d: d != meta["device_id"])
            | st.text(max_size=70).filter(lambda s: s != meta["device_id"])
        )
    elif field == "samples":
        value = draw(st.integers(max_value=0) | st.integers(min_value=2**31))
    elif field == "n":
        value = draw(st.integers().filter(lambda v: v != ctx.n))
    elif field == "nonce":
        value = draw(
            st.text(max_size=40).filter(lambda s: not HEX32_RE.fullmatch(s))
            | hex32.map(str.upper).filter(lambda s: s != s.lower())
        )
    elif field == "train_s":
        value = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False) | st.integers(max_value=-1) | st.just(RAW))
        raw = draw(bad_number_tokens) if value == RAW else None
    else:  # train_loss: any finite number is fine, so only non-finite and overflowing tokens
        value, raw = RAW, draw(bad_number_tokens)
    return Hostile(f"meta_bad_{field}", device, frame(dump(dict(meta, **{field: value}), raw), body))


def m_meta_not_json(draw, ctx, how):
    """Meta that is not a JSON object: invalid UTF-8, cut JSON, another JSON type, deep
    nesting (inside a valid-looking object or alone), or over the 8 KiB bound."""
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    good = dump(meta)
    if how == "not_utf8":
        i = draw(st.integers(0, len(good) - 1))
        meta_b = good[:i] + draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80"])) + good[i + 1 :]
    elif how == "cut":
        meta_b = good[: draw(st.integers(0, len(good) - 1))]
    elif how == "not_object":
        meta_b = json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    elif how == "deep_array":
        d = draw(st.integers(1, MAX_META_BYTES // 2))
        meta_b = b"[" * d + b"]" * d
    elif how == "deep_object":
        d = draw(st.integers(1, (MAX_META_BYTES - 1) // 6))
        meta_b = b'{"a":' * d + b"1" + b"}" * d
    elif how == "deep_field":  # a valid object whose extra field nests too deep
        d = draw(st.integers(1000, (MAX_META_BYTES - len(good) - 10) // 2))
        meta_b = good[:-1] + b',"x":' + b"[" * d + b"]" * d + b"}"
    else:
        pad = draw(st.integers(MAX_META_BYTES - len(good) + 1, MAX_META_BYTES + 4096))
        meta_b = dump(dict(meta, pad="p" * pad))
    return Hostile(f"meta_{how}", device, frame(meta_b, body))


def m_other_message(draw, ctx, which):
    """A well-formed message of another kind on the update topic."""
    device = _topic_device(draw)
    w = _delta(draw, ctx)
    if which == "global":
        payload = GlobalModel(ctx.run_id, ctx.round, ctx.model_hash, w).encode()
    elif which == "chunk":
        payload = encode_chunk(ctx.model_hash, 0, 1, draw(st.binary(max_size=2048)))
    elif which == "ack":
        payload = Ack(ctx.run_id, ctx.round, _meta_device(device), _nonce(draw, ctx), True).encode()
    else:
        payload = RoundState(ctx.run_id, ctx.round, "open").encode()
    return Hostile(f"other_{which}", device, payload)


def m_replay_elsewhere(draw, ctx):
    """An honest device's accepted frame, byte for byte, on another device's topic."""
    owner = draw(st.sampled_from(sorted(ctx.honest_frames)))
    device = draw(st.sampled_from([d for d in VALID_TOPIC_DEVICES + INVALID_TOPIC_DEVICES if d != owner]))
    return Hostile("replay_elsewhere", device, ctx.honest_frames[owner])


def m_second_update(draw, ctx):
    """A well-formed update from a device already counted this round, with a new nonce."""
    device = draw(st.sampled_from(sorted(ctx.honest_frames)))
    meta, body = _valid_parts(draw, ctx, device)
    return Hostile("second_update", device, frame(dump(meta), body))


def m_bad_topic(draw, ctx):
    """A well-formed update from `mallory` on a topic whose last level is not a device id."""
    device = draw(st.sampled_from(INVALID_TOPIC_DEVICES))
    meta, body = _valid_parts(draw, ctx, "mallory")
    return Hostile("bad_topic", device, frame(dump(meta), body))


def _pack(meta: dict, **raw) -> bytes:
    """The packed UPDATE meta of `meta`, built byte by byte; `raw` overrides a struct field with
    any value its type holds (device: the id's bytes, id_len: the length byte)."""
    device = raw.pop("device", meta["device_id"].encode())
    f = dict(
        run_id=bytes.fromhex(meta["run_id"]),
        round=meta["round"],
        model_hash=bytes.fromhex(meta["model_hash"]),
        samples=meta["samples"],
        train_loss=meta["train_loss"],
        train_s=meta["train_s"],
        nonce=bytes.fromhex(meta["nonce"]),
        n=meta["n"],
        id_len=len(device),
    )
    f.update(raw)
    return PACKED_UPDATE.pack(*f.values()) + device


u32 = st.integers(0, 2**32 - 1)
nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])


def m_packed(draw, ctx, how):
    """A packed-meta UPDATE frame (header flag bit 1) wrong in one way: its layout (length byte,
    cut, padded), a field's value, the flag on another kind, or JSON under the flag."""
    device = _topic_device(draw)
    meta, body = _valid_parts(draw, ctx, device)
    kind = 2
    if how == "id_len":
        packed = _pack(meta, id_len=draw(st.integers(0, 255).filter(lambda v: v != len(meta["device_id"]))))
    elif how == "cut":
        good = _pack(meta)
        packed = good[: draw(st.integers(0, len(good) - 1))]
    elif how == "padded":
        packed = _pack(meta) + draw(st.binary(min_size=1, max_size=80))
    elif how == "device_not_utf8":
        packed = _pack(meta, device=draw(st.sampled_from([b"\xff", b"dev\xfe", b"\xc0\x80", b"\xed\xa0\x80x"])))
    elif how == "device_bad_name":
        name = draw(st.text(min_size=1, max_size=64).filter(lambda s: not NAME_RE.fullmatch(s)))
        packed = _pack(meta, device=name.encode("utf-8", "surrogatepass"))
    elif how == "round":
        packed = _pack(meta, round=draw(u32.filter(lambda r: r != ctx.round)))
    elif how == "samples":
        packed = _pack(meta, samples=draw(st.just(0) | st.integers(2**31, 2**32 - 1)))
    elif how == "n":
        packed = _pack(meta, n=draw(u32.filter(lambda v: v != ctx.n)))
    elif how == "train_loss":
        packed = _pack(meta, train_loss=draw(nonfinite))
    elif how == "train_s":
        packed = _pack(
            meta, train_s=draw(nonfinite | st.floats(max_value=-(2.0**-20), allow_nan=False, allow_infinity=False, width=32))
        )
    elif how == "run_id":
        packed = _pack(meta, run_id=draw(st.binary(min_size=16, max_size=16).filter(lambda b: b.hex() != ctx.run_id)))
    elif how == "model_hash":
        packed = _pack(meta, model_hash=draw(st.binary(min_size=32, max_size=32).filter(lambda b: b.hex() != ctx.model_hash)))
    elif how == "other_kind":
        packed, kind = _pack(meta), draw(st.sampled_from([1, 3, 4]))
    else:  # json: the JSON meta under the packed flag
        packed = dump(meta)
    return Hostile(f"packed_{how}", device, frame(packed, body, flags=FLAG_PACKED_META, kind=kind))


PACKED = ("id_len", "cut", "padded", "device_not_utf8", "device_bad_name", "round", "samples", "n")
PACKED += ("train_loss", "train_s", "run_id", "model_hash", "other_kind", "json")
META_NOT_JSON = ("not_utf8", "cut", "not_object", "deep_array", "deep_object", "deep_field", "too_big")
OTHER_MESSAGES = ("global", "chunk", "ack", "round")

# label -> mutation; one flat table so every label is drawn about equally often.
MUTATIONS = {
    "random_small": m_random_small,
    "random_large": m_random_large,
    "random_after_header": m_random_after_header,
    "truncated": m_truncated,
    "padded": m_padded,
    "oversized": m_oversized,
    "body_length": m_body_length,
    "body_nonfinite": m_body_nonfinite,
    "meta_wrong_type": m_meta_wrong_type,
    "meta_missing": m_meta_missing,
    "replay_elsewhere": m_replay_elsewhere,
    "second_update": m_second_update,
    "bad_topic": m_bad_topic,
    **{f"header_{f}": partial(m_header_lie, field=f) for f in HEADER_LIES},
    **{f"meta_bad_{f}": partial(m_meta_bad_value, field=f) for f in ALL_FIELDS},
    **{f"meta_{how}": partial(m_meta_not_json, how=how) for how in META_NOT_JSON},
    **{f"other_{w}": partial(m_other_message, which=w) for w in OTHER_MESSAGES},
    **{f"packed_{how}": partial(m_packed, how=how) for how in PACKED},
}


def collect_hostile(ctx: Ctx, count: int) -> list[Hostile]:
    """`count` examples from Hypothesis' generation loop (see the module docstring)."""
    out: list[Hostile] = []

    @seed(SEED)
    @settings(max_examples=count, phases=[Phase.generate], database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hostile_update(ctx))
    def collect(h: Hostile) -> None:
        out.append(h)

    collect()
    return out


# ------------------------------------------------------------------------------ the run


def honest_deltas(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0, 0.05, n).astype(np.float32) for _ in HONEST]


def honest_update(g: GlobalModel, i: int, delta: np.ndarray) -> Update:
    return Update(g.run_id, g.round, HONEST[i], g.model_hash, SAMPLES[i], LOSSES[i], 0.01, secrets.token_hex(16), delta)


def run_round(mosquitto, tmp_path, bundle, fleet: str, procs, hostile_after: int | None = None):
    """One round, target 3, of the three honest peers A, B, C (A and B first, then C). With
    `hostile_after`, the hostile payloads go out between B's ack and C's update. Returns the
    state dir, the aggregator, the honest updates, and what was published."""
    T = Topics(fleet)
    n = load_bundle(bundle).num_params
    state = tmp_path / f"state-{fleet}"
    wire = Recorder(mosquitto.url, [T.global_model, T.ack("+")], f"wire-{fleet}")
    procs.append(wire)
    agg = AggProc(tmp_path, mosquitto.url, fleet, bundle, state, *agg_args(1, 3, 3, 600), name=f"agg-{fleet}")
    procs.append(agg)
    g = wire.wait(lambda t, p: t == T.global_model and (x := GlobalModel.decode(p)).round == 1 and x, timeout=60)
    deltas = honest_deltas(n)
    sent: list[Update] = []

    def send_honest(i: int) -> None:
        u = honest_update(g, i, deltas[i])
        sent.append(u)
        wire.publish(T.update(u.device_id), u.encode())
        wire.wait(lambda t, p: t == T.ack(u.device_id) and (a := Ack.decode(p)).nonce == u.nonce and a.accepted, timeout=30)

    send_honest(0)
    send_honest(1)
    hostile: list[Hostile] = []
    if hostile_after is not None:
        ctx = Ctx(g.run_id, g.model_hash, n, 1, {u.device_id: u.encode() for u in sent}, frozenset(u.nonce for u in sent))
        drawn = collect_hostile(ctx, hostile_after)
        unique = {(h.device, h.payload): h for h in drawn}
        hostile = list(unique.values())
        publisher = Recorder(mosquitto.url, [], f"hostile-{fleet}")
        procs.append(publisher)
        infos = [publisher.client.publish(f"{T.base}/update/{h.device}", h.payload, qos=1) for h in hostile]
        for info in infos:
            info.wait_for_publish(60)
        assert agg.proc.poll() is None, agg.text()[-3000:]
        want = len(hostile)
        # Wait for every rejection line; give up early once the count stops moving for 10 s.
        last, still = -1, time.monotonic()
        while (
            (got := len(agg_events(agg.text(), "update_rejected"))) < want
            and agg.proc.poll() is None
            and time.monotonic() - still < 10
        ):
            if got != last:
                last, still = got, time.monotonic()
            time.sleep(0.2)
        assert len(agg_events(agg.text(), "update_rejected")) == want, _diagnose(agg.text(), hostile)
    send_honest(2)
    assert agg.wait(60) == 0, agg.text()[-3000:]
    return state, agg, wire, g, sent, hostile


def _diagnose(text: str, hostile: list[Hostile]) -> str:
    lines = text.splitlines()
    odd = [l for l in lines if re.search(r"event=(handler_failed|update_accepted|update_duplicate)", l) or "Traceback" in l]
    return (
        f"{len(agg_events(text, 'update_rejected'))} rejection lines for {len(hostile)} hostile messages; unexpected lines:\n"
        + "\n".join(odd[:40])
    )


def test_a_thousand_hostile_updates_are_each_rejected_once_and_change_nothing(mosquitto, tmp_path, boston_bundle, procs):
    clean_state, _, _, g_clean, clean_sent, _ = run_round(mosquitto, tmp_path, boston_bundle, "hostile-clean", procs)
    state, agg, wire, g, sent, hostile = run_round(
        mosquitto, tmp_path, boston_bundle, "hostile-attacked", procs, hostile_after=N_HOSTILE
    )

    assert len(hostile) >= 1000, f"only {len(hostile)} distinct hostile payloads"
    labels = {h.label for h in hostile}
    assert labels == set(MUTATIONS), f"never generated: {sorted(set(MUTATIONS) - labels)}"

    text = agg.text()
    rejected = agg_events(text, "update_rejected")
    assert len(rejected) == len(hostile), _diagnose(text, hostile)
    assert all(re.search(r" reason=\S", line) for line in rejected)
    assert "handler_failed" not in text and "Traceback" not in text
    assert len(agg_events(text, "update_accepted")) == 3
    # One negative ack per hostile message whose topic names a valid device (where else to answer?).
    acks = [Ack.decode(p) for t, p, _ in wire.snapshot() if t.startswith(Topics("hostile-attacked").base + "/ack/")]
    negative = [a for a in acks if not a.accepted]
    assert len(negative) == sum(1 for h in hostile if NAME_RE.fullmatch(h.device)) and all(a.reason for a in negative)
    assert sorted(a.nonce for a in acks if a.accepted) == sorted(u.nonce for u in sent)

    (rec,) = rounds_log(state)
    assert rec["devices"] == list(HONEST) and rec["samples"] == sum(SAMPLES) and rec["rejected"] == len(hostile)
    # The same honest updates give the bit-identical model with or without the attack.
    assert g.weights.tobytes() == g_clean.weights.tobytes()
    clean, attacked = state_weights(clean_state, 1), state_weights(state, 1)
    assert attacked.tobytes() == clean.tobytes()
    np.testing.assert_allclose(attacked, fedavg(g.weights, sent), rtol=1e-6, atol=1e-7)
    final = wire.wait(lambda t, p: t == Topics("hostile-attacked").global_model and (x := GlobalModel.decode(p)).round == 2 and x)
    assert not final.train and final.weights.tobytes() == attacked.tobytes()


def test_device_rejects_deep_json_and_huge_numbers_in_one_line_each(mosquitto, tmp_path, boston_bundle, boston_shards, procs):
    """The same decoders on the device side: a GLOBAL frame or JSON control message whose
    JSON nests too deep or holds an integer too large for a float is one `message_rejected`
    line (it used to escape as RecursionError / OverflowError: `handler_failed`, status error)."""
    from tests.test_faults import DevProc, device_config

    shards, _ = boston_shards
    fleet = "hostile-device"
    T = Topics(fleet)
    m = load_bundle(boston_bundle)
    run_id = secrets.token_hex(16)
    weights = body_of(np.zeros(m.num_params, np.float32))
    g_meta = {
        "run_id": run_id,
        "round": 1,
        "model_hash": m.model_hash,
        "train": True,
        "total_rounds": 1,
        "deadline": 1.0,
        "config": {},
        "n": m.num_params,
    }
    huge = "9" * 400
    deep = "[" * 5000 + "]" * 5000
    hostile = [
        (
            T.global_model,
            frame(dump(g_meta)[:-1] + b',"x":' + b"[" * 3500 + b"]" * 3500 + b"}", weights, kind=1),
        ),  # < 8 KiB of meta
        (T.global_model, frame(dump(dict(g_meta, deadline=RAW), huge), weights, kind=1)),
        (T.global_model, frame(dump(dict(g_meta, config={"lr": RAW}), huge), weights, kind=1)),
        (
            T.round,
            dump(
                {
                    "v": 1,
                    "run_id": run_id,
                    "round": 1,
                    "state": "open",
                    "total_rounds": 1,
                    "deadline": RAW,
                    "min_devices": 1,
                    "target_devices": 1,
                    "accepted": 0,
                },
                huge,
            ),
        ),
        (T.round, deep.encode()),
        (T.ack("dev-h"), ('{"v":1,"x":' + deep + "}").encode()),
        (T.bundle, ('{"v":1,"manifest":' + '{"a":' * 3000 + "1" + "}" * 3000 + "}").encode()),
    ]
    status = Recorder(mosquitto.url, [T.all_status, T.all_updates], "dev-watch")
    procs.append(status)
    dev = DevProc(device_config(tmp_path, mosquitto.url, fleet, boston_bundle, shards[0], "dev-h"), tmp_path / "dev-h.log")
    procs.append(dev)
    status.wait(lambda t, p: t == T.status("dev-h") and Status.decode(p).state == "idle", timeout=60)
    for topic, payload in hostile:
        status.publish(topic, payload)
    end = time.monotonic() + 20
    while dev.text().count("event=message_rejected") < len(hostile) and time.monotonic() < end:
        time.sleep(0.1)
    text = dev.text()
    assert text.count("event=message_rejected") == len(hostile), text[-3000:]
    assert "handler_failed" not in text and "Traceback" not in text and dev.proc.poll() is None
    assert not [p for t, p, _ in status.snapshot() if t == T.status("dev-h") and Status.decode(p).state == "error"]
    # ...and it still trains on a good global model.
    status.publish(
        T.global_model,
        GlobalModel(run_id, 1, m.model_hash, np.zeros(m.num_params, np.float32), deadline=time.time() + 60).encode(),
    )
    status.wait(lambda t, p: t == T.update("dev-h") and Update.decode(p, m.num_params).round == 1, timeout=30)

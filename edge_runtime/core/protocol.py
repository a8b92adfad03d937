"""The wire protocol: MQTT topics and payload encodings, shared by devices and the aggregator.

Everything here treats its input as hostile: every decoder checks sizes before it allocates,
validates every field, and raises `ProtocolError` with a one-line reason. Nothing is ever
unpickled. docs/protocol.md is the prose version of this file.

Topics (per fleet):
    fleetlearn/<fleet>/global              retained  binary GLOBAL frame: round, model hash, flat weights, round config
    fleetlearn/<fleet>/round               retained  JSON round state (open / closed / finished / failed)
    fleetlearn/<fleet>/update/<device>     -         binary UPDATE frame: device -> aggregator weight delta
    fleetlearn/<fleet>/ack/<device>        -         JSON acknowledgement of one update (accepted or the reason)
    fleetlearn/<fleet>/status/<device>     retained  JSON device status; the MQTT Last Will sets "offline"
    fleetlearn/<fleet>/metrics             retained  JSON metrics of the last closed round
    fleetlearn/<fleet>/bundle              retained  JSON bundle announcement (manifest + chunking)
    fleetlearn/<fleet>/bundle/<hash>/<i>   retained  binary BUNDLE_CHUNK frames of the bundle's files

Binary frame (all integers little-endian):
    offset size field
    0      4    magic b"FLRN"
    4      1    wire version (1)
    5      1    kind (1 GLOBAL, 2 UPDATE, 3 BUNDLE_CHUNK)
    6      1    body encoding (0 float32 LE raw; 1 raw bytes; others reserved, e.g. fp16, zlib)
    7      1    flags (bit 0: signed)
    8      4    meta_len: bytes of the UTF-8 JSON meta object that follows the header
    12     4    body_len: bytes of the body that follows the meta
    16     4    crc32 of the body (zlib.crc32), catches truncation and corruption in transit
    20     2    sig_len: bytes of the signature that follows the body (0 when unsigned)
    22     2    reserved (0)
    24     ...  meta | body | signature
The signature (Ed25519 when present) covers every byte before it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable

import numpy as np

from fleetlearn.edge_runtime.core.errors import ProtocolError

MAGIC = b"FLRN"
WIRE_VERSION = 1
HEADER = struct.Struct("<4sBBBBIIIHH")
HEADER_SIZE = HEADER.size  # 24
MAX_META_BYTES = 8 * 1024
MAX_SIG_BYTES = 512
MAX_JSON_BYTES = 64 * 1024  # any JSON control message (round state, ack, status, metrics)
MAX_BUNDLE_ANNOUNCEMENT_BYTES = 16 * 1024 * 1024
FLAG_SIGNED = 0x01
MAX_ROUND = 2**31 - 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
HEX32_RE = re.compile(r"^[0-9a-f]{32}$")


class Kind(IntEnum):
    GLOBAL = 1
    UPDATE = 2
    BUNDLE_CHUNK = 3


class Encoding(IntEnum):
    F32_LE = 0  # raw little-endian float32 tensor
    RAW = 1  # opaque bytes (bundle chunks)


# ---------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topics:
    """All topic names of one fleet, in one place."""

    fleet: str
    root: str = "fleetlearn"

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.fleet):
            raise ProtocolError(f"fleet name {self.fleet!r} is not safe in a topic")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.fleet}"

    @property
    def global_model(self) -> str:
        return f"{self.base}/global"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def bundle(self) -> str:
        return f"{self.base}/bundle"

    def bundle_chunk(self, model_hash: str, index: int) -> str:
        return f"{self.base}/bundle/{model_hash}/{index}"

    def bundle_chunks(self, model_hash: str) -> str:
        return f"{self.base}/bundle/{model_hash}/+"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{device_id}"

    def ack(self, device_id: str) -> str:
        return f"{self.base}/ack/{device_id}"

    def status(self, device_id: str) -> str:
        return f"{self.base}/status/{device_id}"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.base}/status/+"

    def device_of(self, topic: str, kind: str) -> str:
        """The device id in `<base>/<kind>/<device>`; raises ProtocolError for any other shape."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not a {kind} topic of fleet {self.fleet}")
        device = topic[len(prefix) :]
        if not NAME_RE.fullmatch(device):
            raise ProtocolError(f"topic {topic!r} names an invalid device id")
        return device


# ---------------------------------------------------------------- field checks


def _int(meta: dict, key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def _float(meta: dict, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = meta.get(key)
    # A range check, not math.isfinite(): JSON integers are unbounded and isfinite() raises
    # OverflowError for one too large for a float; the comparison is exact and false for NaN.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not -_FLOAT_MAX <= v <= _FLOAT_MAX or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be a finite number in [{lo}, {hi}], got {v!r:.40}")
    return float(v)


def _str(meta: dict, key: str, pattern: re.Pattern[str]) -> str:
    v = meta.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise ProtocolError(f"field {key!r} is missing or malformed")
    return v


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(payload: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Decode a small JSON control message: bounded, UTF-8, an object, no NaN/Infinity."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what}: {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"{what}: not valid UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    if doc.get("v") != WIRE_VERSION:
        raise ProtocolError(f"{what}: wire version {doc.get('v')!r} is not {WIRE_VERSION}")
    return doc


def encode_json(doc: dict[str, Any]) -> bytes:
    return json.dumps({"v": WIRE_VERSION, **doc}, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    kind: Kind
    encoding: Encoding
    meta: dict[str, Any]
    body: bytes
    signature: bytes = b""
    signed_part: bytes = b""  # the bytes the signature covers


Signer = Callable[[bytes], bytes]


def encode_frame(kind: Kind, meta: dict[str, Any], body: bytes, encoding: Encoding = Encoding.F32_LE, sign: Signer | None = None, sig_len: int = 64) -> bytes:
    """Assemble a frame; with `sign`, append its signature over all preceding bytes."""
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(meta_bytes) > MAX_META_BYTES:
        raise ProtocolError(f"meta is {len(meta_bytes)} bytes, over {MAX_META_BYTES}")
    flags = FLAG_SIGNED if sign else 0
    header = HEADER.pack(MAGIC, WIRE_VERSION, int(kind), int(encoding), flags, len(meta_bytes), len(body), zlib.crc32(body), sig_len if sign else 0, 0)
    unsigned = b"".join((header, meta_bytes, body))
    if not sign:
        return unsigned
    signature = sign(unsigned)
    if len(signature) != sig_len:
        raise ProtocolError(f"signer returned {len(signature)} bytes, expected {sig_len}")
    return unsigned + signature


def decode_frame(payload: bytes, expect: Kind, max_body: int) -> Frame:
    """Parse and check a frame. Sizes are checked against the header and the bounds first."""
    payload = bytes(payload)
    if len(payload) < HEADER_SIZE:
        raise ProtocolError(f"truncated frame: {len(payload)} bytes, header alone is {HEADER_SIZE}")
    magic, version, kind, encoding, flags, meta_len, body_len, crc, sig_len, reserved = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("not a fleetlearn frame (bad magic)")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version} is not {WIRE_VERSION}")
    if kind != expect:
        raise ProtocolError(f"frame kind {kind} where {expect.name} ({int(expect)}) was expected")
    if encoding not in (e.value for e in Encoding):
        raise ProtocolError(f"unknown body encoding {encoding}")
    if flags & ~FLAG_SIGNED or reserved:
        raise ProtocolError(f"unknown flags 0x{flags:02x} or reserved bits set")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"meta length {meta_len} exceeds {MAX_META_BYTES}")
    if body_len > max_body:
        raise ProtocolError(f"body length {body_len} exceeds the {max_body}-byte bound")
    if sig_len > MAX_SIG_BYTES or bool(sig_len) != bool(flags & FLAG_SIGNED):
        raise ProtocolError(f"signature length {sig_len} disagrees with the signed flag")
    total = HEADER_SIZE + meta_len + body_len + sig_len
    if len(payload) != total:
        raise ProtocolError(f"frame is {len(payload)} bytes but its header says {total} (truncated or padded)")
    meta_end = HEADER_SIZE + meta_len
    body = payload[meta_end : meta_end + body_len]
    if zlib.crc32(body) != crc:
        raise ProtocolError("body fails its crc32 check (corrupted in transit)")
    try:
        meta = json.loads(payload[HEADER_SIZE:meta_end].decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"meta is not valid UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(meta, dict):
        raise ProtocolError("meta is not a JSON object")
    return Frame(Kind(kind), Encoding(encoding), meta, body, payload[meta_end + body_len :], payload[: meta_end + body_len])


def tensor_from_body(frame: Frame, num_params: int) -> np.ndarray:
    """The body as a float32 vector of exactly `num_params` finite values (a fresh, writable copy)."""
    if frame.encoding != Encoding.F32_LE:
        raise ProtocolError(f"body encoding {frame.encoding.name} is not supported for tensors")
    if len(frame.body) != 4 * num_params:
        raise ProtocolError(f"tensor has {len(frame.body) // 4} values (body {len(frame.body)} bytes), the model has {num_params}")
    vec = np.frombuffer(frame.body, dtype="<f4").astype(np.float32)
    if not np.isfinite(vec).all():
        raise ProtocolError(f"tensor holds {int((~np.isfinite(vec)).sum())} NaN/Inf values")
    return vec


def tensor_to_body(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class RoundConfig:
    """Training settings the aggregator asks of every device this round (None: device's own)."""

    local_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None

    def to_meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_meta(cls, doc: Any) -> "RoundConfig":
        if not isinstance(doc, dict):
            raise ProtocolError("field 'config' must be an object")
        unknown = set(doc) - {"local_epochs", "max_steps", "batch_size", "lr"}
        if unknown:
            raise ProtocolError(f"round config has unknown keys {sorted(unknown)}")
        return cls(
            local_epochs=_int(doc, "local_epochs", 1, 10_000) if "local_epochs" in doc else None,
            max_steps=_int(doc, "max_steps", 1, 10**9) if "max_steps" in doc else None,
            batch_size=_int(doc, "batch_size", 1, 1 << 20) if "batch_size" in doc else None,
            lr=_float(doc, "lr", 0.0, 10.0) if "lr" in doc else None,
        )


@dataclass(frozen=True)
class GlobalModel:
    """Retained on `global`: the weights that open round `round` (train=False once the run is over)."""

    run_id: str  # 32 hex: one aggregator run (a fresh state dir); round ids restart per run
    round: int
    model_hash: str
    weights: np.ndarray
    train: bool = True
    total_rounds: int = 0
    deadline: float = 0.0  # unix time the round closes at (informational for devices)
    config: RoundConfig = field(default_factory=RoundConfig)
    signature: bytes = b""
    signed_part: bytes = b""

    def encode(self, sign: Signer | None = None) -> bytes:
        meta = {
            "run_id": self.run_id,
            "round": self.round,
            "model_hash": self.model_hash,
            "train": self.train,
            "total_rounds": self.total_rounds,
            "deadline": self.deadline,
            "config": self.config.to_meta(),
            "n": int(self.weights.size),
        }
        return encode_frame(Kind.GLOBAL, meta, tensor_to_body(self.weights), sign=sign)

    @classmethod
    def decode(cls, payload: bytes, num_params: int | None = None, max_params: int = 1 << 28) -> "GlobalModel":
        """Decode; `num_params` (from the device's bundle) pins the size when known."""
        limit = 4 * (num_params if num_params is not None else max_params)
        frame = decode_frame(payload, Kind.GLOBAL, max_body=limit)
        m = frame.meta
        n = _int(m, "n", 1, max_params)
        if num_params is not None and n != num_params:
            raise ProtocolError(f"global model has {n} parameters, this bundle has {num_params}")
        train = m.get("train")
        if not isinstance(train, bool):
            raise ProtocolError("field 'train' must be true or false")
        return cls(
            run_id=_str(m, "run_id", HEX32_RE),
            round=_int(m, "round", 0, MAX_ROUND),
            model_hash=_str(m, "model_hash", HEX64_RE),
            weights=tensor_from_body(frame, n),
            train=train,
            total_rounds=_int(m, "total_rounds", 0, MAX_ROUND),
            deadline=_float(m, "deadline", 0.0),
            config=RoundConfig.from_meta(m.get("config", {})),
            signature=frame.signature,
            signed_part=frame.signed_part,
        )


@dataclass(frozen=True)
class Update:
    """One device's contribution to one round: delta = local weights - global weights."""

    run_id: str
    round: int
    device_id: str
    model_hash: str
    samples: int
    train_loss: float
    train_s: float
    nonce: str  # 32 hex, fixed per (device, round): a re-send carries the same nonce
    delta: np.ndarray
    signature: bytes = b""
    signed_part: bytes = b""

    def encode(self, sign: Signer | None = None) -> bytes:
        meta = {
            "run_id": self.run_id,
            "round": self.round,
            "device_id": self.device_id,
            "model_hash": self.model_hash,
            "samples": self.samples,
            "train_loss": self.train_loss,
            "train_s": self.train_s,
            "nonce": self.nonce,
            "n": int(self.delta.size),
        }
        return encode_frame(Kind.UPDATE, meta, tensor_to_body(self.delta), sign=sign)

    @classmethod
    def decode(cls, payload: bytes, num_params: int) -> "Update":
        """Decode and validate an update for a model of `num_params` parameters."""
        frame = decode_frame(payload, Kind.UPDATE, max_body=4 * num_params)
        m = frame.meta
        n = _int(m, "n", 1, num_params)
        if n != num_params:
            raise ProtocolError(f"update has {n} parameters, the model has {num_params}")
        return cls(
            run_id=_str(m, "run_id", HEX32_RE),
            round=_int(m, "round", 1, MAX_ROUND),
            device_id=_str(m, "device_id", NAME_RE),
            model_hash=_str(m, "model_hash", HEX64_RE),
            samples=_int(m, "samples", 1, 2**31 - 1),
            train_loss=_float(m, "train_loss"),
            train_s=_float(m, "train_s", 0.0),
            nonce=_str(m, "nonce", HEX32_RE),
            delta=tensor_from_body(frame, n),
            signature=frame.signature,
            signed_part=frame.signed_part,
        )


@dataclass(frozen=True)
class Ack:
    """Aggregator -> device: the update for `round` with `nonce` was accepted, or why not."""

    run_id: str
    round: int
    device_id: str
    nonce: str
    accepted: bool
    reason: str = ""

    def encode(self) -> bytes:
        return encode_json({"run_id": self.run_id, "round": self.round, "device_id": self.device_id, "nonce": self.nonce, "accepted": self.accepted, "reason": self.reason[:300]})

    @classmethod
    def decode(cls, payload: bytes) -> "Ack":
        d = decode_json(payload, "ack")
        if not isinstance(d.get("accepted"), bool) or not isinstance(d.get("reason", ""), str):
            raise ProtocolError("ack: 'accepted' must be a boolean and 'reason' a string")
        return cls(_str(d, "run_id", HEX32_RE), _int(d, "round", 0, MAX_ROUND), _str(d, "device_id", NAME_RE), _str(d, "nonce", HEX32_RE), d["accepted"], d.get("reason", "")[:300])


ROUND_STATES = ("open", "closed", "finished", "failed")


@dataclass(frozen=True)
class RoundState:
    """Retained on `round`: where the run is. Devices use `closed` to drop a pending update."""

    run_id: str
    round: int
    state: str
    total_rounds: int = 0
    deadline: float = 0.0
    min_devices: int = 0
    target_devices: int = 0
    accepted: int = 0
    reason: str = ""

    def encode(self) -> bytes:
        return encode_json(dict(self.__dict__))

    @classmethod
    def decode(cls, payload: bytes) -> "RoundState":
        d = decode_json(payload, "round state")
        state = d.get("state")
        if state not in ROUND_STATES:
            raise ProtocolError(f"round state {state!r} not one of {ROUND_STATES}")
        return cls(
            run_id=_str(d, "run_id", HEX32_RE),
            round=_int(d, "round", 0, MAX_ROUND),
            state=state,
            total_rounds=_int(d, "total_rounds", 0, MAX_ROUND),
            deadline=_float(d, "deadline", 0.0),
            min_devices=_int(d, "min_devices", 0, 1 << 30),
            target_devices=_int(d, "target_devices", 0, 1 << 30),
            accepted=_int(d, "accepted", 0, 1 << 30),
            reason=str(d.get("reason", ""))[:300],
        )


DEVICE_STATES = ("idle", "fetching", "training", "uploading", "error", "offline", "ineligible")
POWER_SOURCES = ("ac", "battery")


@dataclass(frozen=True)
class Health:
    """A device's health readings in its status (`health` object). A reading the board does not
    expose is None and left out of the JSON, never guessed; decode bounds every value."""

    uptime_s: float | None = None  # seconds since the device process started
    rss_bytes: int | None = None  # resident memory of the device process
    free_disk_bytes: int | None = None  # free space on the state dir's filesystem
    cpu_temp_c: float | None = None  # hottest CPU thermal zone (/sys/class/thermal)
    power_source: str | None = None  # "ac" or "battery" (/sys/class/power_supply)

    BOUNDS = {"uptime_s": (0.0, 1e10), "rss_bytes": (0, 1 << 50), "free_disk_bytes": (0, 1 << 62), "cpu_temp_c": (-100.0, 300.0)}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, d: Any) -> "Health":
        if not isinstance(d, dict):
            raise ProtocolError("status health must be an object")
        values: dict[str, Any] = {}
        for key, (lo, hi) in cls.BOUNDS.items():
            if d.get(key) is not None:
                values[key] = _int(d, key, lo, hi) if isinstance(lo, int) else _float(d, key, lo, hi)
        power = d.get("power_source")
        if power is not None and power not in POWER_SOURCES:
            raise ProtocolError(f"status health power_source {str(power)[:20]!r} not one of {POWER_SOURCES}")
        return cls(power_source=power, **values)


@dataclass(frozen=True)
class Status:
    """Retained on `status/<device>`; the broker publishes the `offline` Last Will for us.
    `ineligible`: the device's [eligibility] rules say no training now, `detail` says why."""

    device_id: str
    state: str
    round: int = 0
    detail: str = ""
    ts: float = 0.0
    health: Health | None = None

    def encode(self) -> bytes:
        doc = {"device_id": self.device_id, "state": self.state, "round": self.round, "detail": self.detail[:300], "ts": self.ts}
        if self.health is not None:
            doc["health"] = self.health.to_json()
        return encode_json(doc)

    @classmethod
    def decode(cls, payload: bytes) -> "Status":
        d = decode_json(payload, "status")
        if d.get("state") not in DEVICE_STATES:
            raise ProtocolError(f"status state {d.get('state')!r} not one of {DEVICE_STATES}")
        health = Health.from_json(d["health"]) if d.get("health") is not None else None
        return cls(_str(d, "device_id", NAME_RE), d["state"], _int(d, "round", 0, MAX_ROUND), str(d.get("detail", ""))[:300], _float(d, "ts", 0.0), health)


# ---------------------------------------------------------------- bundle distribution


@dataclass(frozen=True)
class BundleAnnouncement:
    """Retained on `bundle`: the manifest, and how its files are cut into chunks.

    The files' bytes are concatenated in `order` and cut into `chunk_size` pieces published
    as BUNDLE_CHUNK frames on `bundle/<model_hash>/<index>`. A device verifies each chunk's
    crc32 and index, then every file's sha256 against the manifest, then installs atomically.
    """

    model_hash: str
    manifest: dict[str, Any]
    order: tuple[str, ...]
    total_bytes: int
    chunk_size: int
    chunks: int

    def encode(self) -> bytes:
        return encode_json({"model_hash": self.model_hash, "manifest": self.manifest, "order": list(self.order), "total_bytes": self.total_bytes, "chunk_size": self.chunk_size, "chunks": self.chunks})

    @classmethod
    def decode(cls, payload: bytes, max_total_bytes: int = 1 << 30) -> "BundleAnnouncement":
        d = decode_json(payload, "bundle announcement", MAX_BUNDLE_ANNOUNCEMENT_BYTES)
        manifest = d.get("manifest")
        order = d.get("order")
        if not isinstance(manifest, dict) or not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            raise ProtocolError("bundle announcement: 'manifest' must be an object and 'order' a list of names")
        total = _int(d, "total_bytes", 1, max_total_bytes)
        size = _int(d, "chunk_size", 1024, 64 << 20)
        chunks = _int(d, "chunks", 1, 1 << 20)
        if chunks != -(-total // size):
            raise ProtocolError("bundle announcement: chunk count does not match total_bytes / chunk_size")
        return cls(_str(d, "model_hash", HEX64_RE), manifest, tuple(order), total, size, chunks)


def encode_chunk(model_hash: str, index: int, count: int, data: bytes) -> bytes:
    return encode_frame(Kind.BUNDLE_CHUNK, {"model_hash": model_hash, "index": index, "count": count}, data, encoding=Encoding.RAW)


def decode_chunk(payload: bytes, model_hash: str, count: int, chunk_size: int) -> tuple[int, bytes]:
    frame = decode_frame(payload, Kind.BUNDLE_CHUNK, max_body=chunk_size)
    if frame.encoding != Encoding.RAW:
        raise ProtocolError("bundle chunk must have RAW encoding")
    if frame.meta.get("model_hash") != model_hash or frame.meta.get("count") != count:
        raise ProtocolError("bundle chunk belongs to another bundle")
    return _int(frame.meta, "index", 0, count - 1), frame.body

"""The binary frame: its header, the one parser of that header, and tensors in the body.

Layout (all integers little-endian; docs/protocol.md has the table):

    0  magic b"FLRN" | 4 version | 5 kind | 6 body encoding | 7 flags (bit 0: signed, bit 1: packed meta)
    8  meta_len | 12 body_len | 16 crc32 of the body | 20 sig_len | 22 reserved (0)
    24 meta (UTF-8 JSON object, or the packed UPDATE meta below) | body | signature (covers every byte before it)

`read_header` is the only code that unpacks a header: `decode_frame` (full checks) and
`peek_meta` (header and meta only, for readers that cannot bound the body or must answer a
frame that fails full decoding) both start from it, and `_meta` is the only code that unpacks
a meta, JSON or packed.

Packed UPDATE meta (flag bit 1; only on UPDATE frames), so that the fixed part of a small
model's compressed update is not ~290 bytes of JSON (docs/protocol.md, "Packed UPDATE meta"):

    0  run_id 16 raw bytes | 16 round u32 | 20 model_hash 32 raw bytes (the full sha256)
    52 samples u32 | 56 train_loss f64 | 64 train_s f32 | 68 nonce 16 raw bytes | 84 n u32
    88 device_id length u8 (1..64) | 89 device_id (UTF-8)         89 + len(device_id) bytes

It unpacks to the same dict the JSON meta gives (hex strings, ints, floats), so every reader
validates both forms with the same field checks (fields.check_*): the unpacker itself checks
only the layout (exact length before any field is read, strict UTF-8). train_loss is f64 so a
device's loss arrives bit for bit as with JSON (4 bytes is 0.0006x of Boston's raw model);
train_s is f32: a duration needs no more than its 7 significant digits.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import (
    HEX32_RE,
    HEX64_RE,
    NAME_RE,
    WIRE_VERSION,
    check_float,
    check_int,
    check_str,
    loads_strict,
)

MAGIC = b"FLRN"
HEADER = struct.Struct("<4sBBBBIIIHH")
HEADER_SIZE = HEADER.size  # 24
MAX_META_BYTES = 8 * 1024
MAX_SIG_BYTES = 512
FLAG_SIGNED = 0x01
FLAG_PACKED_META = 0x02  # UPDATE frames only: the meta is PACKED_UPDATE (+ device id), not JSON
FLAGS = FLAG_SIGNED | FLAG_PACKED_META
# run_id, round, model_hash, samples, train_loss, train_s, nonce, n, device id length
PACKED_UPDATE = struct.Struct("<16sI32sIdf16sIB")
MAX_DEVICE_ID_BYTES = 64  # fields.NAME_RE's bound
_F32_MAX = float(np.finfo(np.float32).max)

Signer = Callable[[bytes], bytes]


class Kind(IntEnum):
    GLOBAL = 1
    UPDATE = 2
    BUNDLE_CHUNK = 3
    PART = 4  # one part of a message larger than the broker's limit (protocol/parts.py)


class Encoding(IntEnum):
    F32_LE = 0  # raw little-endian float32 tensor
    RAW = 1  # opaque bytes (bundle chunks, message parts)
    F16_LE = 2  # little-endian float16 tensor (protocol/encodings.py has every tensor format)
    INT8_BLOCK = 3  # int8 codes with one float32 scale per block
    TOPK = 4  # k (index, float32 value) pairs, indices strictly increasing
    TOPK_GAP16 = 5  # TOPK with each index as its u16 gap from the previous one (encodings.py)


# read_header's lookups, built once (a generator over the enum and Kind(x) per frame cost more
# than the rest of the header check: bench_ingest's profile)
_KINDS = {k.value: k for k in Kind}
_ENCODINGS = {e.value: e for e in Encoding}


def max_frame_bytes(body_bytes: int, signed: bool = True) -> int:
    """The largest frame with a body of `body_bytes`: header + meta bound + body (+ signature bound)."""
    return HEADER_SIZE + MAX_META_BYTES + body_bytes + (MAX_SIG_BYTES if signed else 0)


@dataclass(frozen=True)
class FrameHeader:
    """The 24 bytes in front of every frame, checked against the protocol's bounds."""

    kind: Kind
    encoding: Encoding
    flags: int
    meta_len: int
    body_len: int
    crc32: int
    sig_len: int

    @property
    def total(self) -> int:
        """The exact length of the frame this header describes."""
        return HEADER_SIZE + self.meta_len + self.body_len + self.sig_len

    @property
    def meta_end(self) -> int:
        return HEADER_SIZE + self.meta_len

    @property
    def packed_meta(self) -> bool:
        return bool(self.flags & FLAG_PACKED_META)


def read_header(payload: bytes) -> FrameHeader:
    """The header of `payload`; ProtocolError for anything version 1 does not define.

    Checks magic, version, kind, encoding, flags, the meta and signature bounds. The body's
    bound depends on the reader (the model's size), so callers check `body_len` themselves."""
    if len(payload) < HEADER_SIZE:
        raise ProtocolError(f"truncated frame: {len(payload)} bytes, header alone is {HEADER_SIZE}")
    magic, version, kind, encoding, flags, meta_len, body_len, crc, sig_len, reserved = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("not a fleetlearn frame (bad magic)")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version} is not {WIRE_VERSION}")
    if kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if encoding not in _ENCODINGS:
        raise ProtocolError(f"unknown body encoding {encoding}")
    if flags & ~FLAGS or reserved:
        raise ProtocolError(f"unknown flags 0x{flags:02x} or reserved bits set")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"meta length {meta_len} exceeds {MAX_META_BYTES}")
    if flags & FLAG_PACKED_META:
        if kind != Kind.UPDATE:
            raise ProtocolError(f"packed-meta flag on a frame of kind {kind} (only UPDATE frames pack their meta)")
        if not PACKED_UPDATE.size < meta_len <= PACKED_UPDATE.size + MAX_DEVICE_ID_BYTES:
            raise ProtocolError(
                f"packed meta length {meta_len} is outside [{PACKED_UPDATE.size + 1}, {PACKED_UPDATE.size + MAX_DEVICE_ID_BYTES}]"
            )
    if sig_len > MAX_SIG_BYTES or bool(sig_len) != bool(flags & FLAG_SIGNED):
        raise ProtocolError(f"signature length {sig_len} disagrees with the signed flag")
    return FrameHeader(_KINDS[kind], _ENCODINGS[encoding], flags, meta_len, body_len, crc, sig_len)


def _meta(payload: bytes, header: FrameHeader) -> dict[str, Any]:
    if header.packed_meta:
        return _unpack_update_meta(payload[HEADER_SIZE : header.meta_end])
    try:
        meta = loads_strict(payload[HEADER_SIZE : header.meta_end])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"meta is not valid UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(meta, dict):
        raise ProtocolError("meta is not a JSON object")
    return meta


def pack_update_meta(meta: dict[str, Any]) -> bytes:
    """The packed form of an UPDATE meta (the module docstring's layout). ProtocolError (one
    line) for a field the layout cannot carry: hex ids of the wrong shape, an integer outside
    u32, a non-finite float, a device id NAME_RE refuses. Range rules beyond that (round >= 1,
    samples >= 1) are the reader's, as for JSON."""
    device = check_str(meta, "device_id", NAME_RE).encode("ascii")  # NAME_RE is ASCII
    return (
        PACKED_UPDATE.pack(
            bytes.fromhex(check_str(meta, "run_id", HEX32_RE)),
            check_int(meta, "round", 0, 2**32 - 1),
            bytes.fromhex(check_str(meta, "model_hash", HEX64_RE)),
            check_int(meta, "samples", 0, 2**32 - 1),
            check_float(meta, "train_loss"),
            check_float(meta, "train_s", 0.0, _F32_MAX),
            bytes.fromhex(check_str(meta, "nonce", HEX32_RE)),
            check_int(meta, "n", 0, 2**32 - 1),
            len(device),
        )
        + device
    )


def _unpack_update_meta(raw: bytes) -> dict[str, Any]:
    """The packed meta as the dict its JSON form would give; the layout is checked here (exact
    length first), the fields by the reader's check_* calls. A device id that is not UTF-8
    becomes None, which those checks report as malformed (the other fields stay readable)."""
    if len(raw) <= PACKED_UPDATE.size:
        raise ProtocolError(
            f"packed meta is {len(raw)} bytes, too short for its {PACKED_UPDATE.size}-byte fields and a device id"
        )
    run_id, rnd, model_hash, samples, train_loss, train_s, nonce, n, id_len = PACKED_UPDATE.unpack_from(raw)
    if len(raw) != PACKED_UPDATE.size + id_len:
        raise ProtocolError(
            f"packed meta is {len(raw)} bytes, {PACKED_UPDATE.size + id_len} expected for a {id_len}-byte device id"
        )
    try:
        device: str | None = raw[PACKED_UPDATE.size :].decode("utf-8")
    except UnicodeDecodeError:
        device = None
    return {
        "run_id": run_id.hex(),
        "round": rnd,
        "device_id": device,
        "model_hash": model_hash.hex(),
        "samples": samples,
        "train_loss": train_loss,
        "train_s": train_s,
        "nonce": nonce.hex(),
        "n": n,
    }


def _expect(header: FrameHeader, expect: Kind) -> None:
    if header.kind != expect:
        raise ProtocolError(f"frame kind {int(header.kind)} where {expect.name} ({int(expect)}) was expected")


def peek_meta(payload: bytes, expect: Kind | None = None) -> dict[str, Any]:
    """The header-checked meta object of a frame, without reading or checking its body.

    For readers that do not know the body's bound (a monitor does not know the model's size)
    and for answering a frame that fails full decoding (the ack wants its round and nonce).
    Nothing here is verified beyond the header and the meta's JSON: treat every field as hostile."""
    payload = bytes(payload)
    header = read_header(payload)
    if expect is not None:
        _expect(header, expect)
    if header.meta_end > len(payload):
        raise ProtocolError(f"frame is {len(payload)} bytes, too short for its {header.meta_len}-byte meta")
    return _meta(payload, header)


@dataclass(frozen=True)
class Frame:
    kind: Kind
    encoding: Encoding
    meta: dict[str, Any]
    body: bytes
    signature: bytes = b""
    signed_part: bytes = b""  # the bytes the signature covers


def encode_frame(
    kind: Kind,
    meta: dict[str, Any],
    body: bytes,
    encoding: Encoding = Encoding.F32_LE,
    sign: Signer | None = None,
    sig_len: int = 64,
    packed: bool = False,
) -> bytes:
    """Assemble a frame; with `sign`, append its signature over all preceding bytes. `packed`
    (UPDATE frames only) writes the meta in its packed binary form instead of JSON."""
    if packed:
        if kind != Kind.UPDATE:
            raise ProtocolError(f"only UPDATE frames pack their meta, not {kind.name}")
        meta_bytes = pack_update_meta(meta)
    else:
        meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(meta_bytes) > MAX_META_BYTES:
        raise ProtocolError(f"meta is {len(meta_bytes)} bytes, over {MAX_META_BYTES}")
    flags = (FLAG_SIGNED if sign else 0) | (FLAG_PACKED_META if packed else 0)
    header = HEADER.pack(
        MAGIC,
        WIRE_VERSION,
        int(kind),
        int(encoding),
        flags,
        len(meta_bytes),
        len(body),
        zlib.crc32(body),
        sig_len if sign else 0,
        0,
    )
    unsigned = b"".join((header, meta_bytes, body))
    if not sign:
        return unsigned
    signature = sign(unsigned)
    if len(signature) != sig_len:
        raise ProtocolError(f"signer returned {len(signature)} bytes, expected {sig_len}")
    return unsigned + signature


def decode_frame(payload: bytes, expect: Kind, max_body: int, views: bool = False) -> Frame:
    """Parse and check a frame. Sizes are checked against the header and the bounds first.

    `views=True` returns body, signature and signed part as read-only memoryviews of `payload`
    instead of copies (the aggregator's update path: two copies of a 4 MB body cost more than
    folding the update into the aggregate; bytes() them to keep them past the payload)."""
    payload = bytes(payload)
    header = read_header(payload)
    _expect(header, expect)
    if header.body_len > max_body:
        raise ProtocolError(f"body length {header.body_len} exceeds the {max_body}-byte bound")
    if len(payload) != header.total:
        raise ProtocolError(f"frame is {len(payload)} bytes but its header says {header.total} (truncated or padded)")
    body_end = header.meta_end + header.body_len
    whole = memoryview(payload) if views else payload
    body = whole[header.meta_end : body_end]
    if zlib.crc32(body) != header.crc32:
        raise ProtocolError("body fails its crc32 check (corrupted in transit)")
    meta = _meta(payload, header)
    return Frame(header.kind, header.encoding, meta, body, whole[body_end:], whole[:body_end])  # type: ignore[arg-type]


def tensor_from_body(frame: Frame, num_params: int) -> np.ndarray:
    """The body as a float32 vector of exactly `num_params` finite values (a fresh, writable copy)."""
    if frame.encoding != Encoding.F32_LE:
        raise ProtocolError(f"body encoding {frame.encoding.name} is not supported for tensors")
    if len(frame.body) != 4 * num_params:
        raise ProtocolError(
            f"tensor has {len(frame.body) // 4} values (body {len(frame.body)} bytes), the model has {num_params}"
        )
    vec = np.frombuffer(frame.body, dtype="<f4").astype(np.float32)
    if not np.isfinite(vec).all():
        raise ProtocolError(f"tensor holds {int((~np.isfinite(vec)).sum())} NaN/Inf values")
    return vec


def tensor_to_body(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()

"""The open round's durable twin (PartialRound) and its file, partial_round.bin, plus the framing
the strategy's server state shares (aggregator/model_store.py writes both).

    magic | u32 header length | header JSON (run, round, accepted pairs, scalars, array table,
    crc32 of the body) | body (the strategy's arrays, raw little-endian)

The partial state is written before the acks of every group of accepted updates (group commit,
aggregator/intake.py), so its cost per write matters: the accepted (device, nonce) pairs grow
with the fleet, and AcceptedJson keeps their JSON encoding up to date by appending, so a write
encodes only the pairs that are new since the last write.
"""

from __future__ import annotations

import itertools
import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PARTIAL_MAGIC = b"FLPART1\n"
_U32 = struct.Struct("<I")


@dataclass
class PartialRound:
    """What an open round has accepted so far; persisted before every accepted ack."""

    run_id: str
    round: int
    accepted: dict[str, str] = field(default_factory=dict)  # device -> nonce, arrival order
    strategy: dict[str, Any] = field(default_factory=dict)  # Strategy.partial_state(): the within-round accumulator
    opened_at: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0
    extensions: int = 0
    norms: dict[str, Any] = field(default_factory=dict)  # intake.NormStats.to_doc(): the round's norm telemetry
    cohort: dict[str, Any] = field(default_factory=dict)  # sampling.Cohort.to_doc(): the round's invitations ({}: none)
    # `accepted` as its JSON array of [device, nonce] pairs, when the writer already has it
    # (AcceptedJson); None: encode_partial encodes it.
    accepted_json: str | None = field(default=None, repr=False, compare=False)


def pack_state(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    """A depth-1 dict of JSON values and numpy arrays -> (scalars, array table, raw body)."""
    scalars: dict[str, Any] = {}
    arrays: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<") else arr.dtype
            raw = arr.astype(dtype, copy=False).tobytes()
            arrays.append({"key": key, "dtype": dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)})
            blobs.append(raw)
            offset += len(raw)
        else:
            scalars[key] = value
    return scalars, arrays, b"".join(blobs)


def unpack_state(scalars: dict[str, Any], arrays: list[dict[str, Any]], body: bytes) -> dict[str, Any]:
    """Inverse of pack_state; ValueError for a truncated array."""
    state: dict[str, Any] = dict(scalars)
    for a in arrays:
        chunk = body[a["offset"] : a["offset"] + a["nbytes"]]
        if len(chunk) != a["nbytes"]:
            raise ValueError(f"array {a['key']!r} truncated")
        state[a["key"]] = np.frombuffer(chunk, dtype=np.dtype(a["dtype"])).reshape(a["shape"]).copy()
    return state


def frame_state(magic: bytes, header: dict[str, Any], body: bytes, raw_fields: str = "") -> bytes:
    """magic | u32 header length | header JSON (with the body's crc32) | body. `raw_fields`:
    `"key":<JSON>` members already encoded, spliced into the header object as they are."""
    hb = json.dumps({**header, "crc32": zlib.crc32(body)}, separators=(",", ":"), allow_nan=False)
    if raw_fields:
        hb = "{" + raw_fields + "," + hb[1:]
    data = hb.encode()
    return magic + _U32.pack(len(data)) + data + body


def unframe_state(magic: bytes, raw: bytes, what: str) -> tuple[dict[str, Any], bytes]:
    if not raw.startswith(magic) or len(raw) < len(magic) + 4:
        raise ValueError(f"not a {what} file")
    (hlen,) = _U32.unpack_from(raw, len(magic))
    start = len(magic) + 4
    if start + hlen > len(raw):
        raise ValueError("truncated header")
    header = json.loads(raw[start : start + hlen].decode())
    body = raw[start + hlen :]
    if zlib.crc32(body) != header["crc32"]:
        raise ValueError(f"{what} fails its crc32")
    return header, body


def encode_partial(p: PartialRound) -> bytes:
    """magic | u32 header length | header JSON | arrays (raw, in header order), crc32 in header."""
    scalars, arrays, body = pack_state(p.strategy)
    header = {
        "run_id": p.run_id,
        "round": p.round,
        "strategy": scalars,
        "arrays": arrays,
        "opened_at": p.opened_at,
        "bytes_in": p.bytes_in,
        "bytes_out": p.bytes_out,
        "rejected": p.rejected,
        "extensions": p.extensions,
        "norms": p.norms,
        "cohort": p.cohort,
    }
    accepted = p.accepted_json if p.accepted_json is not None else accepted_json(p.accepted.items())
    return frame_state(PARTIAL_MAGIC, header, body, raw_fields='"accepted":' + accepted)


def decode_partial(raw: bytes) -> PartialRound:
    """Inverse of encode_partial; ValueError with the reason on any inconsistency."""
    header, body = unframe_state(PARTIAL_MAGIC, raw, "partial-round")
    strategy = unpack_state(header["strategy"], header["arrays"], body)
    accepted = {str(d): str(n) for d, n in header["accepted"]}
    return PartialRound(
        run_id=header["run_id"],
        round=int(header["round"]),
        accepted=accepted,
        strategy=strategy,
        opened_at=float(header.get("opened_at", 0.0)),
        bytes_in=int(header.get("bytes_in", 0)),
        bytes_out=int(header.get("bytes_out", 0)),
        rejected=int(header.get("rejected", 0)),
        extensions=int(header.get("extensions", 0)),
        norms=dict(header.get("norms") or {}),
        cohort=dict(header.get("cohort") or {}),
    )


def accepted_json(pairs: Iterable[tuple[str, str]]) -> str:
    """The header's "accepted" value: a JSON array of [device, nonce] pairs."""
    return "[" + ",".join(_pair(d, n) for d, n in pairs) + "]"


def _pair(device: str, nonce: str) -> str:
    return json.dumps([device, nonce], separators=(",", ":"))


class AcceptedJson:
    """`accepted_json(run.accepted.items())`, kept by appending. A round's accepted dict only
    grows, in arrival order (a device's entry is never replaced: another nonce is a rejected
    duplicate), so the pairs encoded for the last write stay valid and only the new ones are
    encoded. Another round, or another dict (a resumed round), starts afresh. The pairs of
    each write are kept as one string (a chunk), not one string per pair: ~50 bytes less per
    device of the round."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._chunks: list[str] = []
        self._count = 0  # pairs in _chunks

    def of(self, rnd: int, accepted: dict[str, str]) -> str:
        key = (rnd, id(accepted))
        if key != self._key or len(accepted) < self._count:
            self._key, self._chunks, self._count = key, [], 0
        if len(accepted) > self._count:
            self._chunks.append(",".join(_pair(d, n) for d, n in itertools.islice(accepted.items(), self._count, None)))
            self._count = len(accepted)
        return "[" + ",".join(self._chunks) + "]"

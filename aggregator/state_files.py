"""The aggregator's state files, encoded: the open round's partial accumulator
(`partial_round.bin`) and a round's cross-round server state (`global/server_000r.bin`).

Both share one framing: magic | u32 header length | header JSON (with the body's crc32) | raw
arrays in the header's order. aggregator/model_store.py decides when they are written; this
module only turns them into bytes and back, checking everything it reads.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PARTIAL_MAGIC = b"FLPART1\n"
SERVER_MAGIC = b"FLSRV1\n\0"
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


def _frame(magic: bytes, header: dict[str, Any], body: bytes) -> bytes:
    hb = json.dumps({**header, "crc32": zlib.crc32(body)}, separators=(",", ":"), allow_nan=False).encode()
    return magic + _U32.pack(len(hb)) + hb + body


def _unframe(magic: bytes, raw: bytes, what: str) -> tuple[dict[str, Any], bytes]:
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
        "accepted": [[d, n] for d, n in p.accepted.items()],
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
    return _frame(PARTIAL_MAGIC, header, body)


def decode_partial(raw: bytes) -> PartialRound:
    """Inverse of encode_partial; ValueError with the reason on any inconsistency."""
    header, body = _unframe(PARTIAL_MAGIC, raw, "partial-round")
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


def encode_server_state(run_id: str, rnd: int, state: dict[str, Any]) -> bytes:
    """The strategy's cross-round state after round `rnd`, in the partial file's framing."""
    scalars, arrays, body = pack_state(state)
    return _frame(SERVER_MAGIC, {"run_id": run_id, "round": rnd, "state": scalars, "arrays": arrays}, body)


def decode_server_state(raw: bytes) -> tuple[str, int, dict[str, Any]]:
    header, body = _unframe(SERVER_MAGIC, raw, "server-state")
    return header["run_id"], int(header["round"]), unpack_state(header["state"], header["arrays"], body)

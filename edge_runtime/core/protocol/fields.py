"""Field checks shared by every decoder, and the JSON envelope of the control messages.

Each check raises ProtocolError with a one-line reason naming the field: a hostile payload
costs the reader one refused message, never an exception it did not expect.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fleetlearn.edge_runtime.core.errors import ProtocolError

WIRE_VERSION = 1
MAX_ROUND = 2**31 - 1
MAX_JSON_BYTES = 64 * 1024  # any JSON control message (round state, ack, status, metrics)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # fleet names and device ids
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")  # model hashes
HEX32_RE = re.compile(r"^[0-9a-f]{32}$")  # run ids, nonces

_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def check_int(meta: dict, key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def check_float(meta: dict, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = meta.get(key)
    # A range check, not math.isfinite(): JSON integers are unbounded and isfinite() raises
    # OverflowError for one too large for a float; the comparison is exact and false for NaN.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not -_FLOAT_MAX <= v <= _FLOAT_MAX or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be a finite number in [{lo}, {hi}], got {v!r:.40}")
    return float(v)


def check_str(meta: dict, key: str, pattern: re.Pattern[str]) -> str:
    v = meta.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise ProtocolError(f"field {key!r} is missing or malformed")
    return v


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every call (json.loads with a keyword builds a new one each time, as
# json.loads without keywords shares its module-level one).
_STRICT = json.JSONDecoder(parse_constant=_no_constants)


def loads_strict(raw: bytes) -> Any:
    """json.loads without NaN/Infinity; ValueError, UnicodeDecodeError or RecursionError otherwise."""
    return _STRICT.decode(bytes(raw).decode("utf-8"))


def decode_json(payload: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Decode a small JSON control message: bounded, UTF-8, an object, no NaN/Infinity."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what}: {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        doc = loads_strict(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"{what}: not valid UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    if doc.get("v") != WIRE_VERSION:
        raise ProtocolError(f"{what}: wire version {doc.get('v')!r} is not {WIRE_VERSION}")
    return doc


# json.dumps with these options builds a JSONEncoder per call (~1 us of each ack): one, shared.
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_json(doc: dict[str, Any]) -> bytes:
    return _COMPACT.encode({"v": WIRE_VERSION, **doc}).encode()

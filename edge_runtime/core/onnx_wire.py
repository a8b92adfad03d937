"""Read the few top-level facts of an ONNX file the portable engine checks, without the onnx package.

An ONNX model is a protobuf `ModelProto`. We walk only its top-level fields (protobuf wire format:
a varint key `field << 3 | wire_type`, then a varint, a fixed 8 or 4 bytes, or a length-prefixed
blob) and decode two of them: `ir_version` (field 1) and each `opset_import` (field 8, an
`OperatorSetIdProto`: domain = field 1, version = field 2), and count `functions` (field 25).
Every node must name a domain its model imports (onnxruntime refuses the model otherwise), so
the imports tell which operator domains the graph may use. Malformed input raises BundleError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import BundleError


@dataclass(frozen=True)
class OnnxFacts:
    ir_version: int
    opsets: dict[str, int]  # domain ("" = default ONNX) -> version
    functions: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one message; value is an int or a bytes slice."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield field, wire, value


def read_onnx_facts(path: Path) -> OnnxFacts:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path.name}: unreadable ({exc.strerror})") from None
    ir, opsets, functions = 0, {}, 0
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 0:
                ir = value if isinstance(value, int) else 0
            elif field == 8 and wire == 2:
                domain, version = "", 0
                for f, w, v in _fields(value if isinstance(value, bytes) else b""):
                    if f == 1 and w == 2:
                        domain = v.decode("utf-8") if isinstance(v, bytes) else ""
                    elif f == 2 and w == 0:
                        version = v if isinstance(v, int) else 0
                opsets[domain] = version
            elif field == 25 and wire == 2:
                functions += 1
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path.name}: not a valid ONNX model ({exc})") from None
    return OnnxFacts(ir, opsets, functions)

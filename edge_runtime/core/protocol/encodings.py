"""Body encodings of a tensor on the wire: float32, fp16, int8 with per-block scales, top-k.

Pure functions, no state. The frame header's `encoding` byte (frame.Encoding) says which one a
body holds; `n` (the model's parameter count) always comes from the reader, never from the
body alone. Every format is little-endian:

    F32_LE      f32[n]                                             4n bytes, exact
    F16_LE      f16[n]                                             2n bytes
    INT8_BLOCK  u32 B | f32 scale[ceil(n/B)] | i8 q[n]             n + 4 ceil(n/B) + 4 bytes
    TOPK        u32 k | u32 index[k] (strictly increasing) | f32 value[k]    8k + 4 bytes
    TOPK_GAP16  u32 k | u16 gap[k] | f32 value[k]                  6k + 4 bytes
                index[0] = gap[0], index[i] = index[i-1] + gap[i] with gap[i] >= 1 (so the
                indices are strictly increasing, hence unique), index[k-1] < n. What devices
                send for topk whenever every gap fits in 16 bits (always when n <= 65,536, and
                at 1% of a large model almost always); otherwise TOPK. Same values as TOPK,
                25% fewer body bytes; the reader sums the gaps in int64 (no overflow).

Error bounds (x the float32 vector, x^ what the reader decodes):
    fp16:  |x - x^| <= 2^-11 |x| for |x| in fp16's normal range [2^-14, 65504], <= 2^-25 below
           it; values beyond +-65504 are saturated to +-65504 (deltas that large are a bug).
    int8:  per block b of B values, scale_b = max|x_b| / 127, q = round(x / scale_b) in
           [-127, 127], x^ = q * scale_b, so |x - x^| <= scale_b / 2 = max|x_b| / 254.
    topk:  x^ keeps the k = ceil(F n) entries of largest |x| exactly and zeroes the rest, so
           ||x - x^||_2 <= sqrt(1 - k/n) ||x||_2. Biased on its own: use it with error
           feedback (`feedback_step`): the device keeps what it did not send and adds it to
           the next round's delta (Stich et al. 2018, "Sparsified SGD with memory"; Lin et
           al. 2018, "Deep Gradient Compression"):
               v_t = e_t + D_t,   sent c_t = C(v_t),   e_{t+1} = v_t - c_t
           so sum_t c_t + e_{T+1} = sum_t D_t (with e_1 = 0): nothing is lost, only delayed.
           In float32 the step is exact: c_t equals v_t where it is nonzero and e_{t+1} is v_t
           elsewhere and 0 there, so c_t + e_{t+1} == v_t bit for bit.

Threat model: a body is hostile input from any device (or a broker in the middle). Decoders
check the exact body length for `n` before allocating anything, every header field (block
size and k within bounds), every index (in range, strictly increasing, hence unique: top-k
gaps >= 1 after the first), every scale and value (finite; scales >= 0; int8 codes in
[-127, 127]) and the decoded vector (finite: a finite scale times 127 can still overflow), and raise ProtocolError with a one-line reason.
No body is ever larger than `max_body_bytes(n)` (= the float32 body plus 16), so the size bound
a reader checks before decoding covers every encoding. Compression is post-processing: it
keeps any differential-privacy guarantee of the delta it encodes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.frame import Encoding

DEFAULT_INT8_BLOCK = 512  # Boston: 0.271x raw per whole frame at 512 (0.273x at 256); the metric does not move
MIN_INT8_BLOCK = 8
MAX_INT8_BLOCK = 1 << 16
MAX_TOPK_FRACTION = 0.5  # above that the indices cost more than float32
FP16_MAX = 65504.0
_U32 = struct.Struct("<I")
_MAX_GAP16 = 0xFFFF
TENSOR_ENCODINGS = (Encoding.F32_LE, Encoding.F16_LE, Encoding.INT8_BLOCK, Encoding.TOPK, Encoding.TOPK_GAP16)


@dataclass(frozen=True)
class Compression:
    """What the aggregator asks devices to encode their deltas with (`--compression`, sent in
    the round config as its text form: "none", "fp16", "int8:256", "topk:0.01")."""

    kind: str = "none"  # none | fp16 | int8 | topk
    block: int = 0  # int8: values per scale
    fraction: float = 0.0  # topk: share of values sent

    @classmethod
    def parse(cls, text: str) -> Compression:
        """ProtocolError (one line) for anything but none | fp16 | int8[:BLOCK] | topk:FRACTION."""
        if not isinstance(text, str) or len(text) > 32:
            raise ProtocolError(f"compression must be none, fp16, int8[:BLOCK] or topk:FRACTION, got {text!r:.40}")
        kind, _, arg = text.partition(":")
        if kind in ("none", "fp16") and not arg:
            return cls(kind)
        if kind == "int8":
            try:
                block = int(arg) if arg else DEFAULT_INT8_BLOCK
            except ValueError:
                block = -1
            if not MIN_INT8_BLOCK <= block <= MAX_INT8_BLOCK:
                raise ProtocolError(f"int8 block size must be an integer in [{MIN_INT8_BLOCK}, {MAX_INT8_BLOCK}], got {arg!r}")
            return cls("int8", block=block)
        if kind == "topk":
            try:
                fraction = float(arg)
            except ValueError:
                fraction = math.nan
            if not 0 < fraction <= MAX_TOPK_FRACTION:
                raise ProtocolError(f"topk fraction must be in (0, {MAX_TOPK_FRACTION}], got {arg!r}")
            return cls("topk", fraction=fraction)
        raise ProtocolError(f"compression must be none, fp16, int8[:BLOCK] or topk:FRACTION, got {text!r:.40}")

    def __str__(self) -> str:
        if self.kind == "int8":
            return f"int8:{self.block}"
        if self.kind == "topk":
            return f"topk:{self.fraction:g}"
        return self.kind

    @property
    def encoding(self) -> Encoding:
        """The body encoding devices send (top-k: TOPK_GAP16, or TOPK when a gap exceeds 16 bits)."""
        return {"none": Encoding.F32_LE, "fp16": Encoding.F16_LE, "int8": Encoding.INT8_BLOCK, "topk": Encoding.TOPK_GAP16}[
            self.kind
        ]

    @property
    def error_feedback(self) -> bool:
        """Whether devices keep a residual for this encoding (top-k drops most of each delta)."""
        return self.kind == "topk"


NONE = Compression()


def max_body_bytes(n: int) -> int:
    """The largest body any encoding produces for `n` values (float32's, plus headroom)."""
    return 4 * n + 16


def topk_count(n: int, fraction: float) -> int:
    """k = ceil(fraction * n), at least 1 and at most ceil(n / 2)."""
    return max(1, min(math.ceil(fraction * n), -(-n // 2)))


# ---------------------------------------------------------------- encoders


def encode_tensor(vec: np.ndarray, c: Compression = NONE) -> tuple[Encoding, bytes]:
    """(encoding, body) of a finite float32 vector under `c` (see the module docstring)."""
    x = np.ascontiguousarray(vec, dtype=np.float32).ravel()
    if c.kind == "none":
        return Encoding.F32_LE, x.astype("<f4", copy=False).tobytes()
    if c.kind == "fp16":
        return Encoding.F16_LE, np.clip(x, -FP16_MAX, FP16_MAX).astype("<f2").tobytes()
    if c.kind == "int8":
        return Encoding.INT8_BLOCK, _encode_int8(x, c.block)
    if c.kind == "topk":
        return _encode_topk(x, topk_count(x.size, c.fraction))
    raise ValueError(f"unknown compression {c.kind!r}")


def _encode_int8(x: np.ndarray, block: int) -> bytes:
    n = x.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:n] = x
    blocks = padded.reshape(nb, block)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8).ravel()[:n]
    return b"".join((_U32.pack(block), scales.astype("<f4").tobytes(), q.tobytes()))


def _encode_topk(x: np.ndarray, k: int) -> tuple[Encoding, bytes]:
    idx = np.argpartition(np.abs(x), x.size - k)[x.size - k :] if k < x.size else np.arange(x.size)
    idx = np.sort(idx)
    values = x[idx].astype("<f4").tobytes()
    gaps = np.diff(idx, prepend=0)
    if int(gaps.max()) <= _MAX_GAP16:
        return Encoding.TOPK_GAP16, b"".join((_U32.pack(k), gaps.astype("<u2").tobytes(), values))
    return Encoding.TOPK, b"".join((_U32.pack(k), idx.astype("<u4").tobytes(), values))


# ---------------------------------------------------------------- decoders (hostile input)


def decode_tensor(encoding: Encoding, body: bytes, n: int) -> np.ndarray:
    """The float32 vector of exactly `n` finite values in `body`.

    float32 bodies decode to a read-only view of `body` (zero-copy: the aggregator folds 4 MB
    per update of a 1M-parameter model and a copy costs as much as the fold); the other
    encodings to a fresh array. Copy before writing into it."""
    if encoding == Encoding.F32_LE:
        if len(body) != 4 * n:
            raise ProtocolError(f"tensor has {len(body) // 4} values (body {len(body)} bytes), the model has {n}")
        vec = np.frombuffer(body, dtype="<f4")
        if vec.dtype != np.float32:  # a big-endian host: the one case that must convert
            vec = vec.astype(np.float32)
    elif encoding == Encoding.F16_LE:
        if len(body) != 2 * n:
            raise ProtocolError(f"fp16 body is {len(body)} bytes, {2 * n} expected for {n} values")
        vec = np.frombuffer(body, dtype="<f2").astype(np.float32)
    elif encoding == Encoding.INT8_BLOCK:
        vec = _decode_int8(body, n)
    elif encoding == Encoding.TOPK:
        vec = _decode_topk(body, n)
    elif encoding == Encoding.TOPK_GAP16:
        vec = _decode_topk_gap16(body, n)
    else:
        raise ProtocolError(f"body encoding {encoding.name} is not a tensor encoding")
    if not np.isfinite(vec).all():  # one pass; count the bad values only for the message
        raise ProtocolError(f"tensor holds {int((~np.isfinite(vec)).sum())} NaN/Inf values")
    return vec


def _decode_int8(body: bytes, n: int) -> np.ndarray:
    if len(body) < 4:
        raise ProtocolError(f"int8 body is {len(body)} bytes, too short for its block size")
    (block,) = _U32.unpack_from(body)
    if not MIN_INT8_BLOCK <= block <= MAX_INT8_BLOCK:
        raise ProtocolError(f"int8 block size {block} is outside [{MIN_INT8_BLOCK}, {MAX_INT8_BLOCK}]")
    nb = -(-n // block)
    want = 4 + 4 * nb + n
    if len(body) != want:
        raise ProtocolError(f"int8 body is {len(body)} bytes, {want} expected for {n} values in blocks of {block}")
    scales = np.frombuffer(body, dtype="<f4", count=nb, offset=4)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ProtocolError("int8 scales must be finite and >= 0")
    q = np.frombuffer(body, dtype=np.int8, count=n, offset=4 + 4 * nb)
    if (q == -128).any():
        raise ProtocolError("int8 code -128 is outside [-127, 127]")
    with np.errstate(over="ignore"):  # overflow to Inf is caught by the caller's finite check
        return (q.astype(np.float32) * np.repeat(scales.astype(np.float32), block)[:n]).astype(np.float32)


def _topk_count(body: bytes, n: int, index_bytes: int, what: str) -> int:
    """k from a top-k body (u32 k | k indices of `index_bytes` | k float32 values), checked
    against n and the body's exact length before anything is read past the count."""
    if len(body) < 4:
        raise ProtocolError(f"topk body is {len(body)} bytes, too short for its count")
    (k,) = _U32.unpack_from(body)
    kmax = -(-n // 2)
    if not 1 <= k <= kmax:
        raise ProtocolError(f"topk count {k} is outside [1, {kmax}] for {n} values")
    if len(body) != 4 + (index_bytes + 4) * k:
        raise ProtocolError(f"{what} body is {len(body)} bytes, {4 + (index_bytes + 4) * k} expected for k={k}")
    return k


def _topk_scatter(body: bytes, n: int, k: int, idx: np.ndarray) -> np.ndarray:
    """The dense vector from checked indices (strictly increasing, < n) and the body's values."""
    if int(idx[-1]) >= n:  # increasing: the last is the largest
        raise ProtocolError(f"topk index {int(idx[-1])} is out of range for {n} values")
    values = np.frombuffer(body, dtype="<f4", count=k, offset=len(body) - 4 * k)
    if not np.isfinite(values).all():
        raise ProtocolError(f"topk values hold {int((~np.isfinite(values)).sum())} NaN/Inf")
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
    return out


def _decode_topk(body: bytes, n: int) -> np.ndarray:
    k = _topk_count(body, n, 4, "topk")
    idx = np.frombuffer(body, dtype="<u4", count=k, offset=4)
    if k > 1 and not (np.diff(idx.astype(np.int64)) > 0).all():
        raise ProtocolError("topk indices must be strictly increasing (unique, sorted)")
    return _topk_scatter(body, n, k, idx)


def _decode_topk_gap16(body: bytes, n: int) -> np.ndarray:
    k = _topk_count(body, n, 2, "topk gap16")
    gaps = np.frombuffer(body, dtype="<u2", count=k, offset=4)
    if k > 1 and not (gaps[1:] > 0).all():
        raise ProtocolError("topk gaps after the first must be >= 1 (indices strictly increasing, unique)")
    idx = np.cumsum(gaps, dtype=np.int64)  # <= 65535 k: no overflow
    return _topk_scatter(body, n, k, idx)


# ---------------------------------------------------------------- error feedback


def feedback_step(
    residual: np.ndarray | None, delta: np.ndarray, c: Compression
) -> tuple[Encoding, bytes, np.ndarray, np.ndarray]:
    """One step of error feedback: (encoding, body, v, e_next) with v = e + delta, body = C(v)
    and e_next = v - decode(C(v)). `residual` None means zero (a fresh run)."""
    v = np.asarray(delta, dtype=np.float32).copy()
    if residual is not None:
        if residual.shape != v.shape:
            raise ValueError(f"residual has {residual.size} values, the delta {v.size}")
        v += residual.astype(np.float32)
    encoding, body = encode_tensor(v, c)
    sent = decode_tensor(encoding, body, v.size)
    return encoding, body, v, v - sent

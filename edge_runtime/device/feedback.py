"""The device's error-feedback residual for compressed updates, kept durably beside the pending
update (protocol/encodings.py states the math: v = e + delta, send C(v), keep e' = v - C(v)).

One file, `ef_residual.bin`, written atomically and fsynced *before* the pending update:

    b"FLEF" | u32 n | 32 ascii nonce | f32 before[n] | f32 after[n]

`before` is the residual the update with `nonce` was built from (e), `after` the one it leaves
(e'). Which one is current depends on what else is on disk, so that a crash anywhere never
applies a residual twice and never loses one:

    nonce == SETTLED                         -> after   (the update was settled: ack or round over)
    nonce == the pending update's nonce      -> after   (the update is durable and will be re-sent)
    otherwise (no such pending update)       -> before  (crashed between this file and the
                                                         pending update: that update never
                                                         existed, the round is trained again)

Settling (before the pending update is deleted) rewrites the file with nonce SETTLED; a refused
update (the aggregator said no) is refunded on settling: after + sent = e + delta, so its mass
returns to the memory. A settle for a nonce the file does not hold changes nothing, so a
re-sent, re-refused update is never refunded twice. An update dropped without an answer (its
round closed first) is treated as counted: possibly lost, never double-applied. A new run, or a
model of another size, starts from zero.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes
from fleetlearn.edge_runtime.core.protocol import (
    Compression,
    Update,
    UpdateHeader,
    decode_frame,
    decode_tensor,
    feedback_step,
    max_body_bytes,
)
from fleetlearn.edge_runtime.core.protocol.frame import Kind, Signer

FILE = "ef_residual.bin"
MAGIC = b"FLEF"
SETTLED = "-" * 32
_HEAD = struct.Struct("<4sI32s")


class ErrorFeedback:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE

    def _read(self, n: int) -> tuple[str, np.ndarray, np.ndarray] | None:
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        if len(raw) != _HEAD.size + 8 * n:
            return None  # another model's size (or damaged): start from zero
        magic, count, nonce = _HEAD.unpack_from(raw)
        if magic != MAGIC or count != n:
            return None
        before = np.frombuffer(raw, dtype="<f4", count=n, offset=_HEAD.size).astype(np.float32)
        after = np.frombuffer(raw, dtype="<f4", count=n, offset=_HEAD.size + 4 * n).astype(np.float32)
        return nonce.decode("ascii", "replace"), before, after

    def _write(self, nonce: str, before: np.ndarray, after: np.ndarray) -> None:
        head = _HEAD.pack(MAGIC, before.size, nonce.encode("ascii"))
        atomic_write_bytes(self.path, head + before.astype("<f4").tobytes() + after.astype("<f4").tobytes(), durable=True)

    def current(self, n: int, pending: bytes | None) -> np.ndarray | None:
        """The residual the next update starts from (None: zero), given the pending update on disk."""
        doc = self._read(n)
        if doc is None:
            return None
        nonce, before, after = doc
        if nonce == SETTLED or (pending is not None and _nonce_of(pending) == nonce):
            return after
        return before

    def encode(self, update: Update, compression: Compression, pending: bytes | None, sign: Signer | None = None) -> bytes:
        """The update's frame under `compression`. With error feedback (top-k, or a residual left
        from an earlier round), the residual is added first and the new one written durably
        before this returns: the caller writes the pending update after it."""
        n = update.delta.size
        residual = self.current(n, pending)
        if not compression.error_feedback and (residual is None or not residual.any()):
            return update.encode(sign=sign, compression=compression)  # nothing held back: no residual to keep
        _, _, v, after = feedback_step(residual, update.delta, compression)
        before = residual if residual is not None else np.zeros(n, dtype=np.float32)
        self._write(update.nonce, before, after)
        return replace(update, delta=v).encode(sign=sign, compression=compression)

    def settle(self, nonce: str, refused_payload: bytes | None = None) -> None:
        """The update `nonce` is settled (call before deleting the pending update). With
        `refused_payload` (the aggregator refused it) its transmitted values go back into the
        residual. Idempotent: a nonce the file does not hold changes nothing."""
        try:
            raw = self.path.read_bytes()[: _HEAD.size]
            magic, n, tag = _HEAD.unpack(raw)
        except (OSError, struct.error):
            return
        if magic != MAGIC or tag.decode("ascii", "replace") != nonce:
            return
        doc = self._read(n)
        if doc is None:
            return
        _, before, after = doc
        if refused_payload is not None:
            sent = _sent_values(refused_payload, n)
            if sent is not None:
                after = after + sent
        self._write(SETTLED, before, after)

    def reset(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _nonce_of(payload: bytes) -> str | None:
    try:
        return UpdateHeader.peek(payload).nonce
    except ProtocolError:
        return None


def _sent_values(payload: bytes, n: int) -> np.ndarray | None:
    try:
        frame = decode_frame(payload, Kind.UPDATE, max_body=max_body_bytes(n))
        return decode_tensor(frame.encoding, frame.body, n)
    except ProtocolError:
        return None

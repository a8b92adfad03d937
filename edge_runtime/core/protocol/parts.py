"""Messages larger than a broker allows, cut into parts, and the one chunk assembly that puts
parts (and bundle chunks, protocol/bundle.py) back together.

Managed brokers cap a message (AWS IoT Core 128 KB, Azure IoT Hub 256 KB, mosquitto's
`message_size_limit`). With `--max-message-size M` any GLOBAL or UPDATE frame longer than M is
sent as PART frames, each at most M bytes:

    PART frame: kind 4, encoding RAW, meta {"id": sha256 hex of the whole message,
                "index": i, "count": N, "total": bytes of the whole message, "size": S},
                body = bytes [i*S, min((i+1)*S, total)) of the whole message

Where they travel: an update's parts on the device's own `update/<device>` topic, one after
another (not retained); the global model's on `global/part/<i>`, retained, so a device that
reconnects picks up every part again (and the `global` topic itself is cleared). A device
re-sends its pending update part by part after every reconnect; the parts are the same bytes
(the id is the whole frame's sha256), so a receiver continues the partial message it holds.

Integrity: each part's crc32 (frame header), its index, its exact length, and agreement with
the message's declared (count, total, size); then the sha256 of the whole message. The signed
frame inside (when signing is on) is verified as usual once whole.

Threat model: parts are hostile input. A receiver never holds more than the declared total of a
message, and the declared total is bounded by the receiver (its model's largest frame) before
anything is kept; memory grows with the data received, not with what a part claims. At most
`per_sender` partial messages per sender (the oldest is dropped for a newer one) and
`max_partials` in all; partial messages older than `timeout` are dropped. A part that is out of
range, of the wrong length, declares a different layout for the same id (overlapping), or
repeats an index with other bytes is refused with a one-line reason and changes nothing; the
same part twice is harmless (a re-send). A whole message failing its sha256 is dropped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.encodings import max_body_bytes
from fleetlearn.edge_runtime.core.protocol.fields import HEX64_RE, check_int, check_str
from fleetlearn.edge_runtime.core.protocol.frame import HEADER_SIZE, Encoding, Kind, decode_frame, encode_frame, max_frame_bytes
from fleetlearn.edge_runtime.core.protocol.messages import MAX_MODEL_PARAMS

PART_META_RESERVE = 512  # bytes of a part's (or bundle chunk's) meta, reserved out of the limit
MIN_PART_BYTES = 1024
MAX_PARTS = 1 << 20
PART_TIMEOUT_S = 600.0  # a partial message not completed in this long is dropped (the sender re-sends)


def part_capacity(max_message_size: int) -> int:
    """Body bytes per part for a message limit: the limit minus the header and the meta reserve."""
    return max_message_size - HEADER_SIZE - PART_META_RESERVE


def chunk_count(total: int, size: int) -> int:
    return -(-total // size)


class ChunkAssembly:
    """The chunks of one message of `total` bytes cut into `size`-byte pieces (the last one
    shorter), gathered by index until complete. Used for bundles and message parts alike."""

    def __init__(self, total: int, size: int, count: int):
        if total < 1 or size < 1 or count != chunk_count(total, size):
            raise ProtocolError(f"chunk layout does not add up: {count} chunks of {size} bytes for {total} bytes")
        self.total, self.size, self.count = total, size, count
        self._chunks: dict[int, bytes] = {}
        self.received = 0  # bytes held (never more than total)

    def expected(self, index: int) -> int:
        return self.size if index < self.count - 1 else self.total - self.size * (self.count - 1)

    def add(self, index: int, data: bytes) -> bool:
        """Keep chunk `index`; False for an exact repeat; ProtocolError (nothing kept) otherwise."""
        if not 0 <= index < self.count:
            raise ProtocolError(f"chunk index {index} is outside [0, {self.count - 1}]")
        if len(data) != self.expected(index):
            raise ProtocolError(f"chunk {index} has {len(data)} bytes, expected {self.expected(index)}")
        held = self._chunks.get(index)
        if held is not None:
            if held != data:
                raise ProtocolError(f"chunk {index} arrived again with different bytes")
            return False
        self._chunks[index] = bytes(data)
        self.received += len(data)
        return True

    @property
    def complete(self) -> bool:
        return len(self._chunks) == self.count

    @property
    def progress(self) -> str:
        return f"{len(self._chunks)}/{self.count}"

    def assemble(self) -> bytes:
        if not self.complete:
            missing = [i for i in range(self.count) if i not in self._chunks][:5]
            raise ProtocolError(f"message incomplete: chunks {missing} missing")
        return b"".join(self._chunks[i] for i in range(self.count))


@dataclass(frozen=True)
class Part:
    id: str  # sha256 hex of the whole message
    index: int
    count: int
    total: int
    size: int
    data: bytes

    def encode(self) -> bytes:
        meta = {"id": self.id, "index": self.index, "count": self.count, "total": self.total, "size": self.size}
        return encode_frame(Kind.PART, meta, self.data, encoding=Encoding.RAW)

    @classmethod
    def decode(cls, payload: bytes, max_total: int) -> Part:
        """A checked part of a message of at most `max_total` bytes."""
        frame = decode_frame(payload, Kind.PART, max_body=max(MIN_PART_BYTES, min(len(payload), max_total)))
        if frame.encoding != Encoding.RAW or frame.signature:
            raise ProtocolError("a part must be RAW and unsigned")
        m = frame.meta
        total = check_int(m, "total", 1, max_total)
        size = check_int(m, "size", MIN_PART_BYTES, max_total)
        count = check_int(m, "count", 1, MAX_PARTS)
        if count != chunk_count(total, size):
            raise ProtocolError(f"part declares {count} parts of {size} bytes for {total} bytes")
        return cls(check_str(m, "id", HEX64_RE), check_int(m, "index", 0, count - 1), count, total, size, frame.body)


def is_part(payload: bytes) -> bool:
    """Whether `payload` is a PART frame (by its kind byte; full checks come with decoding)."""
    return len(payload) >= HEADER_SIZE and payload[:4] == b"FLRN" and payload[5] == Kind.PART


def split_message(payload: bytes, max_message_size: int | None) -> list[bytes]:
    """`payload` itself when it fits (or there is no limit), else its PART frames."""
    if not max_message_size or len(payload) <= max_message_size:
        return [payload]
    size = part_capacity(max_message_size)
    if size < MIN_PART_BYTES:
        raise ProtocolError(f"a message limit of {max_message_size} bytes leaves no room for parts")
    digest = hashlib.sha256(payload).hexdigest()
    count = chunk_count(len(payload), size)
    out = [Part(digest, i, count, len(payload), size, payload[i * size : (i + 1) * size]).encode() for i in range(count)]
    assert all(len(p) <= max_message_size for p in out)
    return out


class PartsBusy(ProtocolError):
    """A part of a new message while the receiver already holds as many partial messages as it
    allows: load, not an attack; the sender re-sends after a reconnect."""


@dataclass
class _Partial:
    assembly: ChunkAssembly
    started: float


@dataclass
class Reassembler:
    """Partial messages by (sender, id), bounded (module docstring). Time is passed in (`now`)."""

    max_total: int  # the largest whole message accepted
    per_sender: int = 2
    max_partials: int = 256
    timeout: float = 300.0
    _partials: dict[tuple[str, str], _Partial] = field(default_factory=dict)

    def feed(self, sender: str, payload: bytes, now: float) -> bytes | None:
        """The whole message once its last part arrives; None while incomplete; ProtocolError
        (one line) for a refused part or a whole message that fails its sha256."""
        part = Part.decode(payload, self.max_total)
        self.expire(now)
        key = (sender, part.id)
        held = self._partials.get(key)
        if held is None:
            layout = ChunkAssembly(part.total, part.size, part.count)
            mine = sorted((p.started, k) for k, p in self._partials.items() if k[0] == sender)
            while len(mine) >= self.per_sender:  # a newer message supersedes the oldest partial
                del self._partials[mine.pop(0)[1]]
            if len(self._partials) >= self.max_partials:
                raise PartsBusy(f"too many partial messages in flight ({self.max_partials})")
            held = _Partial(layout, now)
            self._partials[key] = held
        a = held.assembly
        if (part.total, part.size, part.count) != (a.total, a.size, a.count):
            raise ProtocolError(
                f"part {part.index} overlaps message {part.id[:12]} with another layout ({part.total} bytes in {part.size}-byte parts, not {a.total} in {a.size})"
            )
        a.add(part.index, part.data)
        if not a.complete:
            return None
        del self._partials[key]
        whole = a.assemble()
        if hashlib.sha256(whole).hexdigest() != part.id:
            raise ProtocolError(f"reassembled message {part.id[:12]} fails its sha256 (a part was replaced)")
        return whole

    def expire(self, now: float) -> int:
        """Drop partial messages older than `timeout`; how many were dropped."""
        old = [k for k, p in self._partials.items() if now - p.started > self.timeout]
        for k in old:
            del self._partials[k]
        return len(old)

    def drop(self, sender: str) -> None:
        for k in [k for k in self._partials if k[0] == sender]:
            del self._partials[k]

    @property
    def held_bytes(self) -> int:
        return sum(p.assembly.received for p in self._partials.values())

    def __len__(self) -> int:
        return len(self._partials)


class GlobalParts:
    """The global model's retained parts on `global/part/<i>`, reassembled with a receiver's
    limits: bounded by the largest model a device accepts, at most two partial models (e.g. the
    last round's and this one's). Devices and the monitor hold the same bound."""

    def __init__(self, max_params: int = MAX_MODEL_PARAMS):
        self.reassembler = Reassembler(
            max_total=max_frame_bytes(max_body_bytes(max_params)), per_sender=2, max_partials=2, timeout=PART_TIMEOUT_S
        )

    def feed(self, payload: bytes, now: float | None = None) -> bytes | None:
        """The whole GLOBAL frame once complete; None for a cleared part or while incomplete."""
        if not payload:
            return None
        return self.reassembler.feed("global", payload, time.monotonic() if now is None else now)

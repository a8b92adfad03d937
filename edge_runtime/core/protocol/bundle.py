"""The bundle on the wire: its retained announcement and the chunk frames of its files.

fleetlearn/<fleet>/bundle              retained  BundleAnnouncement (manifest, order, chunking)
fleetlearn/<fleet>/bundle/<hash>/<i>   retained  BUNDLE_CHUNK frame i of the concatenated files
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import HEX64_RE, check_int, check_str, decode_json, encode_json
from fleetlearn.edge_runtime.core.protocol.frame import Encoding, Kind, decode_frame, encode_frame

MAX_BUNDLE_ANNOUNCEMENT_BYTES = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024  # the aggregator's default --chunk-size
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 << 20


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
        return encode_json(
            {
                "model_hash": self.model_hash,
                "manifest": self.manifest,
                "order": list(self.order),
                "total_bytes": self.total_bytes,
                "chunk_size": self.chunk_size,
                "chunks": self.chunks,
            }
        )

    @classmethod
    def decode(cls, payload: bytes, max_total_bytes: int = 1 << 30) -> BundleAnnouncement:
        d = decode_json(payload, "bundle announcement", MAX_BUNDLE_ANNOUNCEMENT_BYTES)
        manifest = d.get("manifest")
        order = d.get("order")
        if not isinstance(manifest, dict) or not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            raise ProtocolError("bundle announcement: 'manifest' must be an object and 'order' a list of names")
        total = check_int(d, "total_bytes", 1, max_total_bytes)
        size = check_int(d, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        chunks = check_int(d, "chunks", 1, 1 << 20)
        if chunks != -(-total // size):
            raise ProtocolError("bundle announcement: chunk count does not match total_bytes / chunk_size")
        return cls(check_str(d, "model_hash", HEX64_RE), manifest, tuple(order), total, size, chunks)


def encode_chunk(model_hash: str, index: int, count: int, data: bytes) -> bytes:
    return encode_frame(
        Kind.BUNDLE_CHUNK, {"model_hash": model_hash, "index": index, "count": count}, data, encoding=Encoding.RAW
    )


def decode_chunk(payload: bytes, model_hash: str, count: int, chunk_size: int) -> tuple[int, bytes]:
    frame = decode_frame(payload, Kind.BUNDLE_CHUNK, max_body=chunk_size)
    if frame.encoding != Encoding.RAW:
        raise ProtocolError("bundle chunk must have RAW encoding")
    if frame.meta.get("model_hash") != model_hash or frame.meta.get("count") != count:
        raise ProtocolError("bundle chunk belongs to another bundle")
    return check_int(frame.meta, "index", 0, count - 1), frame.body

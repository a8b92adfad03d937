"""Publishing the bundle itself over MQTT, so a device needs nothing but a broker URL.

    fleetlearn/<fleet>/bundle              retained  BundleAnnouncement (manifest, order, chunking)
    fleetlearn/<fleet>/bundle/<hash>/<i>   retained  BUNDLE_CHUNK frame i of the concatenated files

The files listed by the manifest are concatenated in the manifest's order (`order`) and cut
into `chunk_size` pieces (protocol.DEFAULT_CHUNK_SIZE, 256 KiB, by default; the last one is shorter). A device checks each
chunk's crc32 and index, then each file's sha256 against the manifest (edge_runtime/device/bundle_fetch.py).

When a run with another model replaces an older one on the same fleet, the old run's retained
chunks would stay on the broker forever; the aggregator reads the retained announcement it
finds at start and clears the old chunks (empty retained payloads), best effort.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.bundle import Manifest, check_chunk_size, plan_announcement
from fleetlearn.edge_runtime.core.errors import BundleError
from fleetlearn.edge_runtime.core.protocol import DEFAULT_CHUNK_SIZE, BundleAnnouncement, Topics, encode_chunk

__all__ = ["BundlePlan", "check_chunk_size", "plan_bundle", "iter_chunks", "chunk_messages", "clear_messages"]


@dataclass(frozen=True)
class BundlePlan:
    bundle_dir: Path
    announcement: BundleAnnouncement

    @property
    def model_hash(self) -> str:
        return self.announcement.model_hash


def plan_bundle(bundle_dir: str | Path, manifest: Manifest, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BundlePlan:
    """The announcement for a verified bundle (edge_runtime.core.bundle.plan_announcement)."""
    return BundlePlan(Path(bundle_dir), plan_announcement(bundle_dir, manifest, chunk_size))


def iter_chunks(plan: BundlePlan) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every chunk, reading the files in order, one chunk in memory at a time."""
    a = plan.announcement
    buf = bytearray()
    index = 0
    for name in a.order:
        with open(plan.bundle_dir / name, "rb") as f:
            while True:
                need = a.chunk_size - len(buf)
                data = f.read(need)
                if not data:
                    break
                buf += data
                if len(buf) == a.chunk_size:
                    yield index, bytes(buf)
                    index += 1
                    buf.clear()
    if buf:
        yield index, bytes(buf)
        index += 1
    if index != a.chunks:
        raise BundleError(f"{plan.bundle_dir}: files changed while being published ({index} chunks, announced {a.chunks})")


def chunk_messages(plan: BundlePlan, topics: Topics) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every chunk frame."""
    a = plan.announcement
    for index, data in iter_chunks(plan):
        yield topics.bundle_chunk(a.model_hash, index), encode_chunk(a.model_hash, index, a.chunks, data)


def clear_messages(old: BundleAnnouncement, topics: Topics) -> Iterator[tuple[str, bytes]]:
    """Empty retained payloads that delete an old bundle's chunks from the broker."""
    for index in range(old.chunks):
        yield topics.bundle_chunk(old.model_hash, index), b""

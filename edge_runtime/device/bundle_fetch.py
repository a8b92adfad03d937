"""Receiving a bundle over MQTT and installing it without ever leaving a half-written bundle.

The aggregator publishes a `BundleAnnouncement` (the manifest, file order, chunking) and the
files' concatenated bytes as numbered chunks. We keep at most one assembly in memory, bounded
by the announced total, check every chunk, then every file's sha256 against the manifest, and
only then move the new bundle into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from fleetlearn.edge_runtime.core.bundle import MANIFEST, Manifest, load_bundle, parse_manifest
from fleetlearn.edge_runtime.core.errors import BundleError, ProtocolError
from fleetlearn.edge_runtime.core.files import atomic_write_json
from fleetlearn.edge_runtime.core.protocol import BundleAnnouncement, ChunkAssembly, decode_chunk

MAX_BUNDLE_BYTES = 512 * 1024 * 1024


class BundleAssembly:
    """Chunks of one announced bundle, gathered until complete."""

    def __init__(self, announcement: BundleAnnouncement):
        if announcement.total_bytes > MAX_BUNDLE_BYTES:
            raise ProtocolError(f"announced bundle is {announcement.total_bytes} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
        manifest = parse_manifest(announcement.manifest)  # raises BundleError on a bad manifest
        if manifest.model_hash != announcement.model_hash:
            raise ProtocolError("bundle announcement's model_hash disagrees with its manifest")
        if set(announcement.order) != set(manifest.files):
            raise ProtocolError("bundle announcement's file order does not list exactly the manifest's files")
        sizes = [manifest.files[name].get("size") for name in announcement.order]
        if (
            not all(isinstance(s, int) and s >= 0 for s in sizes)
            or sum(s for s in sizes if isinstance(s, int)) != announcement.total_bytes
        ):
            raise ProtocolError("bundle announcement's total_bytes disagrees with the manifest's file sizes")
        self.announcement = announcement
        self.manifest = manifest
        # The same assembly as message parts (protocol/parts.py): index, length and repeat checks.
        self._chunks = ChunkAssembly(announcement.total_bytes, announcement.chunk_size, announcement.chunks)

    @property
    def model_hash(self) -> str:
        return self.announcement.model_hash

    @property
    def complete(self) -> bool:
        return self._chunks.complete

    @property
    def progress(self) -> str:
        return self._chunks.progress

    def add(self, payload: bytes) -> None:
        a = self.announcement
        index, data = decode_chunk(payload, a.model_hash, a.chunks, a.chunk_size)
        try:
            self._chunks.add(index, data)
        except ProtocolError as exc:
            raise ProtocolError(f"bundle {exc.reason}") from None

    def install(self, bundle_dir: str | Path) -> Manifest:
        """Write, verify and swap the bundle into `bundle_dir`. Raises BundleError if any file fails."""
        target = Path(bundle_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = self._chunks.assemble()
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
        try:
            offset = 0
            for name in self.announcement.order:
                size = self.manifest.files[name]["size"]
                (staging / name).write_bytes(blob[offset : offset + size])
                offset += size
            atomic_write_json(staging / MANIFEST, self.announcement.manifest)
            manifest = load_bundle(staging)  # verifies every file's sha256
            _swap_in(staging, target)
            return manifest
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`. The old bundle is moved aside first and removed last, so a
    crash in between leaves either the old bundle, or no bundle (fetched again at start), never
    a mix of two versions."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{int(time.time() * 1000)}"
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def try_load_bundle(bundle_dir: str | Path) -> tuple[Manifest | None, str]:
    """(manifest, "") for a good bundle; (None, reason) when it is missing, empty or corrupt."""
    try:
        return load_bundle(bundle_dir), ""
    except BundleError as exc:
        return None, str(exc)

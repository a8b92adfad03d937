"""Crash-safe files: every write goes to a temp file in the same directory, then is renamed
over the target, so a crash leaves either the old file or the new one, never half.

`durable=True` (the default) also fsyncs the file and its directory, so the new file survives
a power cut, not only a process crash. That costs milliseconds on an SD card, so callers
use `durable=False` for files they can rebuild (see the device agent's pending update).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    # fsync the directory so the rename itself survives a power cut.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_json(path: str | Path, doc: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode(), durable)


def read_json(path: str | Path) -> Any | None:
    """The JSON at `path`, or None when it does not exist or cannot be parsed (then we start over)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class DeviceState:
    """What a device must remember across a power cut (state_dir/device_state.json)."""

    run_id: str = ""
    last_round: int = 0  # the last round whose update was acknowledged or whose round closed
    rounds_done: int = 0  # rounds completed by this process lifetime's counting (for --max-rounds)
    pending_round: int = 0  # round of the update not yet acknowledged (0: none)
    pending_nonce: str = ""

    @classmethod
    def load(cls, state_dir: Path) -> "DeviceState":
        doc = read_json(state_dir / "device_state.json")
        if not isinstance(doc, dict):
            return cls()
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError:
            return cls()

    def save(self, state_dir: Path) -> None:
        # Not fsynced: after a power cut the pending update file (which is) tells the agent
        # what was pending, and a lost "last round" only makes it re-send an update that the
        # aggregator then recognises (same nonce) or refuses as late. Never counted twice.
        atomic_write_json(state_dir / "device_state.json", asdict(self), durable=False)


def save_pending_update(state_dir: Path, payload: bytes) -> None:
    """The encoded update frame, written durably before it is first sent; re-sent as-is after a restart."""
    atomic_write_bytes(state_dir / "pending_update.bin", payload, durable=True)


def load_pending_update(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / "pending_update.bin").read_bytes()
    except OSError:
        return None


def clear_pending_update(state_dir: Path) -> None:
    try:
        (state_dir / "pending_update.bin").unlink()
    except FileNotFoundError:
        pass


def save_vector(path: Path, vec: np.ndarray) -> None:
    atomic_write_bytes(path, np.ascontiguousarray(vec, dtype="<f4").tobytes())


def load_vector(path: Path, n: int) -> np.ndarray | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) != 4 * n:
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)

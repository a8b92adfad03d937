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
import tomllib
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True, sync_dir: bool = True) -> None:
    """`durable`: fsync the file, and (`sync_dir`) its directory after the rename; a caller
    writing several files into one directory may pass sync_dir=False and `fsync_dir` once."""
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
    if durable and sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so the renames and new names in it survive a power cut."""
    try:
        dfd = os.open(path, os.O_RDONLY)
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


def read_toml(path: Path, kind: str = "config", error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Decode a TOML file, or raise `error` with a one-line reason naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {kind} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None

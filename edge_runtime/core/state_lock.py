"""One process per state dir: an OS file lock (flock) held for the process's life.

Two aggregators on one state dir interleave checkpoints and the round log; two devices on one
state dir overwrite each other's pending update. `lock_state_dir` takes an exclusive,
non-blocking `fcntl.flock` on STATE_DIR/.lock and writes the holder's pid into it. The kernel
drops the lock when the process exits in any way (SIGKILL and power cuts included), so a stale
lock file never blocks a restart: only a live holder does. The pid in the file is a hint for
the operator's message, not the lock itself.

flock locks are per open file description: the lock is held as long as the returned
`StateLock` (its file descriptor) is alive. Linux and macOS only (fcntl).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import UsageError

LOCK_NAME = ".lock"


class StateDirLocked(UsageError):
    """Another live process holds the state dir (the CLI prints this line and exits 2)."""


class StateLock:
    """An exclusive lock on a state dir; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def lock_state_dir(state_dir: str | Path, what: str) -> StateLock:
    """Lock `state_dir` (created if missing) for this process, or raise StateDirLocked naming
    the holder's pid. `what` names this process's role in the message ("aggregator", "device")."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"state dir {state_dir}: cannot create its lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder_pid(fd)
        os.close(fd)
        raise StateDirLocked(
            f"state dir {state_dir} is in use by another fleetlearn process (pid {pid}); stop it or give this {what} its own state dir"
        ) from None
    except OSError as exc:  # e.g. a filesystem without flock support
        os.close(fd)
        raise UsageError(f"state dir {state_dir}: cannot lock it ({exc.strerror})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(state_dir, fd)

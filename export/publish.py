"""Build a bundle in a temporary directory beside its target, then move it into place.

A failed export therefore never leaves a partial bundle at the target path, and `--force`
replaces an old bundle only once the new one is complete (two renames on the same filesystem;
readers see the old bundle, briefly nothing, then the new one; never a mix).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetlearn.edge_runtime.core.bundle import MANIFEST
from fleetlearn.export.errors import UsageError


def check_target(target: Path, force: bool) -> None:
    """Refuse an output path we must not write. Cheap: call it before any heavy work."""
    if target.is_symlink():
        raise UsageError(f"output {target} is a symbolic link; give the real directory")
    if not target.exists():
        if target.parent.exists() and not target.parent.is_dir():
            raise UsageError(f"cannot create {target}: {target.parent} is not a directory")
        return
    if not target.is_dir():
        raise UsageError(f"output {target} exists and is not a directory")
    if not force:
        raise UsageError(f"output directory {target} already exists; pass --force to replace it")
    # --force replaces bundles, never arbitrary directories (think `--out ~ --force`).
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise UsageError(f"{target} exists and is not a bundle (no {MANIFEST}); refusing to replace it, even with --force")


@contextmanager
def staged_directory(target: Path, force: bool) -> Iterator[Path]:
    """Yield an empty directory beside `target`; publish it as `target` if the block succeeds.

    On any exception the staging directory, and any parent directories this call created, are
    removed, and the exception propagates.
    """
    target = Path(os.path.abspath(target))
    check_target(target, force)
    created = _make_parents(target.parent)
    staging: Path | None = None
    try:
        staging = _fresh_name(target, "export")
        try:
            os.mkdir(staging)  # not mkdtemp: that makes it 0700, and the bundle should get the umask's mode
        except OSError as exc:
            staging = None
            raise UsageError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
        yield staging
        _publish(staging, target, force)
        staging = None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _fresh_name(target: Path, tag: str) -> Path:
    """A hidden, unused sibling of target (same filesystem, so rename is a rename, not a copy)."""
    while True:
        candidate = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"
        if not candidate.exists():
            return candidate


def _make_parents(parent: Path) -> list[Path]:
    missing: list[Path] = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {parent}: {exc.strerror or exc}") from None
    return list(reversed(missing))  # outermost first


def _publish(staging: Path, target: Path, force: bool) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    check_target(target, force)  # it may have appeared or changed while we were exporting
    backup = _fresh_name(target, "old")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)

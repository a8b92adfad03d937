"""The replay ledger (aggregator/signing.py's rule 2): (device, nonce) -> (round, digest) of the
run's updates, bounded, in memory and appended to `seen_nonces.jsonl` in the state dir.

The file: a header line naming the run, then one JSON line [device, nonce, round, digest] per
entry; compacted (rewritten atomically, old rounds dropped) once a round. Entries are written
when recorded and handed to the OS by `flush()`, which the aggregator calls before any verdict
leaves the process (aggregator/intake.py: before each ack, accepted or not), so a verdict
never depends on an entry a killed process lost. Not fsynced: see NonceLedger.check.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TextIO

from fleetlearn.edge_runtime.core.files import atomic_write_bytes
from fleetlearn.edge_runtime.core.protocol import HEX32_RE, NAME_RE

LEDGER_FORMAT = "fleetlearn-seen-nonces"
KEEP_ROUNDS = 16
MAX_PER_DEVICE = 64
DIGEST_HEX = re.compile(r"^[0-9a-f]{32}$")


class NonceLedger:
    """(device, nonce) -> (round, digest) of the run's updates, bounded, appended to a file.

    One JSON line per entry after a header line naming the run; a torn last line (a crash mid-
    append) is skipped on load. Not thread-safe: the round engine's thread owns it.

    Memory: a device's entries are one bytes object of ENTRY-byte records (nonce 16 raw bytes,
    round u32, digest 16 raw bytes), not a dict of tuples of hex strings (~36 bytes per entry
    instead of ~400: the ledger holds every device of the last KEEP_ROUNDS rounds)."""

    def __init__(
        self, path: Path, run_id: str, open_round: int, keep_rounds: int = KEEP_ROUNDS, per_device: int = MAX_PER_DEVICE
    ):
        self.path = Path(path)
        self.run_id = run_id
        self.keep_rounds = keep_rounds
        self.per_device = per_device
        self.seen: dict[str, bytes] = {}  # device -> its records (_ENTRY each), oldest first
        self._compacted_at = open_round
        self._file: TextIO | None = None  # kept open for appends; reopened after each compaction
        self._load()
        self._prune(open_round)
        self._rewrite()

    def entries(self, device: str) -> dict[str, tuple[int, str]]:
        """nonce -> (round, digest) of `device`, hex as in the file (for tests and tools)."""
        return {n.hex(): (r, d.hex()) for n, r, d in _records(self.seen.get(device, b""))}

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        if not lines:
            return
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != LEDGER_FORMAT or header.get("run_id") != self.run_id:
            return  # another run's (or a corrupt) ledger: this run starts afresh
        for line in lines[1:]:
            try:
                device, nonce, rnd, digest = json.loads(line)
            except (ValueError, TypeError):
                continue
            if (
                isinstance(device, str)
                and NAME_RE.fullmatch(device)
                and isinstance(nonce, str)
                and HEX32_RE.fullmatch(nonce)
                and isinstance(rnd, int)
                and 0 <= rnd < 2**32
                and isinstance(digest, str)
                and DIGEST_HEX.fullmatch(digest)
            ):
                self._put(device, bytes.fromhex(nonce), rnd, bytes.fromhex(digest))

    def _put(self, device: str, nonce: bytes, rnd: int, digest: bytes) -> None:
        """Record (nonce, rnd, digest) for `device`, replacing an entry with the same nonce."""
        old = self.seen.get(device, b"")
        if old and _find(old, nonce) is not None:
            old = b"".join(_ENTRY.pack(n, r, d) for n, r, d in _records(old) if n != nonce)
        self.seen[device] = old + _ENTRY.pack(nonce, rnd, digest)

    def _prune(self, open_round: int) -> None:
        oldest = open_round - self.keep_rounds  # rounds <= this are forgotten
        for device in list(self.seen):
            kept = [e for e in _records(self.seen[device]) if e[1] > oldest]
            if len(kept) > self.per_device:
                kept = sorted(kept, key=lambda e: e[1])[-self.per_device :]
            if kept:
                self.seen[device] = b"".join(_ENTRY.pack(*e) for e in kept)
            else:
                del self.seen[device]

    def _rewrite(self) -> None:
        self.close()  # the rename below replaces the file the handle appends to
        lines = [json.dumps({"format": LEDGER_FORMAT, "run_id": self.run_id, "keep_rounds": self.keep_rounds})]
        for device, records in self.seen.items():
            lines += [_line(device, n.hex(), r, d.hex()) for n, r, d in _records(records)]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode(), durable=False)

    def check(self, device: str, nonce: str, rnd: int, digest: str, open_round: int) -> str | None:
        """Why (device, nonce) is a replay, or None; a nonce seen for the first time is recorded,
        and appended to the file's buffer: `flush()` hands it to the OS before any verdict that
        depends on it leaves the process (aggregator/intake.py flushes before every ack)."""
        raw = bytes.fromhex(nonce)  # nonce and digest are 32 hex (validated before, update_digest)
        records = self.seen.get(device)
        prior = _find(records, raw) if records else None
        if prior is not None:
            seen_round, seen_digest = prior
            if seen_round != rnd:
                return f"replay: nonce {nonce[:8]} was already used in round {seen_round}"
            if seen_digest != bytes.fromhex(digest):
                return f"replay: nonce {nonce[:8]} was already used for a different update in round {seen_round}"
            return None  # the same update again: an idempotent re-send
        if open_round > self._compacted_at:  # once a round: forget old rounds, shrink the file
            self.flush()
            self._prune(open_round)
            self._rewrite()
            self._compacted_at = open_round
        records = self.seen.get(device, b"") + _ENTRY.pack(raw, rnd, bytes.fromhex(digest))
        self.seen[device] = records
        # Written (it survives the process being killed once flushed) but not fsynced: after a
        # power cut the last entries may be lost, and that is safe. An update of the open round
        # is still deduplicated by the persisted round state, and one of an earlier round is
        # refused as late; an fsync here would cost milliseconds per update on the critical path.
        # Not flushed here either: a write() per update cost ~3 us of the engine thread, and
        # nothing depends on the entry before a verdict leaves (flush()).
        if self._file is None:  # one open per compaction, not one per update
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(_line(device, nonce, rnd, digest) + "\n")
        if len(records) > self.per_device * _ENTRY.size:
            self._prune(open_round)  # in memory; the file catches up at the next compaction
        return None

    def flush(self) -> None:
        """Hand every recorded entry to the OS (it then survives the process being killed)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_ENTRY = struct.Struct("<16sI16s")  # a ledger record: nonce, round, digest (raw)


def _records(records: bytes) -> list[tuple[bytes, int, bytes]]:
    return list(_ENTRY.iter_unpack(records))


def _find(records: bytes, nonce: bytes) -> tuple[int, bytes] | None:
    """(round, digest) of `nonce` in a device's records, or None."""
    for start in range(0, len(records), _ENTRY.size):
        if records[start : start + 16] == nonce:
            _, rnd, digest = _ENTRY.unpack_from(records, start)
            return rnd, digest
    return None


def _line(device: str, nonce: str, rnd: int, digest: str) -> str:
    """The file's JSON line for one entry (device ids match NAME_RE and the others are hex:
    nothing to escape, so no json.dumps per update)."""
    return f'["{device}","{nonce}",{rnd},"{digest}"]'

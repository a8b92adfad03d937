"""The round log, `STATE_DIR/rounds.jsonl`: one RoundMetrics object per line, one line per closed round.

The one reader and the one writer of the file. The model store appends to it (after the
commit point, see model_store.py), and the CLI layer reads it: `fleetlearn report`, the demo's
progress and summary. Each line is a RoundMetrics (fleetlearn.edge_runtime.core.protocol.metrics)
without the wire envelope, checked as strictly as the `metrics` message.

Writing: the whole file is rewritten and renamed over the old one for every round
(append_round_record), so the aggregator never leaves a torn line; a round closed again after
a restart replaces its line. A torn last line can still come from elsewhere (a copy taken
mid-rename by a tool, a file from another program): the reader drops it and says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes
from fleetlearn.edge_runtime.core.protocol import RoundMetrics

ROUND_LOG = "rounds.jsonl"


@dataclass(frozen=True)
class RoundLog:
    """A round log, read. `rounds` is the latest run, one record per round number, in order."""

    path: Path
    records: tuple[RoundMetrics, ...]  # every readable line, in file order (all runs)
    rounds: tuple[RoundMetrics, ...]
    run_id: str = ""
    torn_tail: bool = False  # the last line was cut short (no newline, does not parse)
    bad_lines: tuple[int, ...] = ()  # 1-based line numbers skipped as unreadable
    bad_reasons: tuple[str, ...] = ()  # why, one per bad line
    other_runs: int = 0  # earlier runs found in the same file and left out of `rounds`

    @property
    def test_metric(self) -> str | None:
        """The test metric most rounds report (a run reports one kind)."""
        names = [r.test_metric for r in self.rounds if r.test_metric]
        return max(set(names), key=names.count) if names else None

    def warnings(self) -> list[str]:
        out = []
        if self.torn_tail:
            out.append(f"{self.path}: the last line is torn (cut short mid-write) and was ignored")
        if self.bad_lines:
            shown = ", ".join(f"{n} ({why})" for n, why in zip(self.bad_lines[:5], self.bad_reasons))
            out.append(
                f"{self.path}: skipped {len(self.bad_lines)} unreadable line(s): {shown}{' ...' if len(self.bad_lines) > 5 else ''}"
            )
        if self.other_runs:
            out.append(
                f"{self.path}: holds {self.other_runs} earlier run(s); only the latest (run {self.run_id[:8]}) is reported"
            )
        return out


def parse_round_log(data: bytes, path: Path = Path(ROUND_LOG)) -> RoundLog:
    """The log in `data` (a file's bytes). Never raises for content: bad lines are listed.

    A last line without its newline that does not parse is torn and flagged; any other
    unreadable line is skipped and listed with its reason. A round logged twice keeps its last
    record. Only the latest run_id is in `rounds`: a log that spans runs would otherwise mix
    round 1 of one run with round 1 of the next."""
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    if ends_with_newline:
        lines.pop()  # the empty string after the final newline
    records: list[RoundMetrics] = []
    bad: list[tuple[int, str]] = []
    torn = False
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = RoundMetrics.from_doc(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
            if i == len(lines) and not ends_with_newline:
                torn = True
            else:
                bad.append((i, "not JSON"))
            continue
        except ProtocolError as exc:
            bad.append((i, exc.reason[:80]))
            continue
        records.append(record)
    run_ids = [r.run_id for r in records if r.run_id]
    latest = run_ids[-1] if run_ids else ""
    by_round: dict[int, RoundMetrics] = {}
    for r in records:
        if not latest or not r.run_id or r.run_id == latest:
            by_round[r.round] = r
    rounds = tuple(by_round[k] for k in sorted(by_round))
    return RoundLog(
        path,
        tuple(records),
        rounds,
        latest,
        torn,
        tuple(n for n, _ in bad),
        tuple(why for _, why in bad),
        len(set(run_ids) - {latest}),
    )


def read_round_log(path: str | Path) -> RoundLog:
    """Read `rounds.jsonl`. Raises FileNotFoundError (OSError); an empty log is the caller's call."""
    path = Path(path)
    return parse_round_log(path.read_bytes(), path)


def read_round_log_or_empty(path: str | Path) -> RoundLog:
    """The log, or an empty one when the file does not exist (yet) or cannot be read."""
    try:
        return read_round_log(path)
    except OSError:
        return parse_round_log(b"", Path(path))


def append_round_record(path: Path, record: RoundMetrics) -> None:
    """Add one round's line by rewriting the whole file and renaming it over the old one.

    A crash leaves the old file or the new one, never a torn line. A record for a round of the
    same run that is already in the log replaces it (a round re-closed after a crash is logged
    once); lines of earlier runs are kept, before this run's, and unreadable lines are dropped.
    The cost is O(file size) per round, which is small: a line is a few hundred bytes."""
    log = read_round_log_or_empty(path)
    kept = [r for r in log.records if not (r.round == record.round and r.run_id == record.run_id)]
    others = [r for r in kept if r.run_id != record.run_id]
    mine = sorted([r for r in kept if r.run_id == record.run_id] + [record], key=lambda r: r.round)
    data = "".join(json.dumps(r.to_doc(), separators=(",", ":"), allow_nan=False) + "\n" for r in others + mine)
    atomic_write_bytes(path, data.encode())


def append_round_lines(path: Path, records: list[RoundMetrics]) -> None:
    """Append records as lines, fsynced: for a writer that knows the file ends with a whole line
    and holds none of these rounds (the model store after its first rewrite). A crash mid-append
    can leave a torn last line: the reader drops it, and the restart's repair rewrites the file
    with the committed records (model_store.py)."""
    data = "".join(json.dumps(r.to_doc(), separators=(",", ":"), allow_nan=False) + "\n" for r in records)
    with open(path, "ab") as f:
        f.write(data.encode())
        f.flush()
        os.fsync(f.fileno())

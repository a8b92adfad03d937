"""One round's metrics, parsed tolerantly, and the aggregator's round log (`rounds.jsonl`).

The same record shape arrives two ways: retained on `fleetlearn/<fleet>/metrics` (the monitor)
and as one line per round in `STATE_DIR/rounds.jsonl` (the report). Both readers share this
parser so they agree on what a round's numbers mean.

Tolerant on purpose: the aggregator may add fields at any time, and a regression run reports
`test_mse` where a classification run reports `test_accuracy`. Only `round` is required; a
field of the wrong type reads as missing rather than failing the whole record, because an
operator's view should show what it can.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Preferred names first: when a record carries several test metrics, this picks the headline.
TEST_METRIC_PREFERENCE = ("test_mse", "test_accuracy", "test_loss", "test_mae", "test_rmse")
# Fields this module understands; everything else is kept in `extra` for the table/JSON.
_KNOWN = {"v", "round", "run_id", "devices", "samples", "train_loss", "wall_s", "bytes_in", "bytes_out", "rejected", "deadline_extensions", "epsilon", "delta"}


def _num(doc: dict[str, Any], key: str) -> float | None:
    v = doc.get(key)
    # A range check, not math.isfinite: an integer too big for a float (hostile metrics) makes
    # isfinite raise OverflowError; the comparison is exact for ints and false for NaN.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -sys.float_info.max <= v <= sys.float_info.max:
        return None
    return float(v)


def _count(doc: dict[str, Any], key: str) -> int | None:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return None
    return v


def _device_ids(value: Any) -> tuple[str, ...]:
    """Device ids from a list of strings or of objects naming a device (`device_id`/`device`)."""
    if not isinstance(value, list):
        return ()
    out: list[str] = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("device_id", item.get("device"))
        if isinstance(item, str) and item and len(item) <= 64:
            out.append(item)
    return tuple(out)


def pick_test_metric(doc: dict[str, Any]) -> tuple[str | None, float | None]:
    """The headline test metric of a record: (name, value), or (None, None)."""
    for name in TEST_METRIC_PREFERENCE:
        value = _num(doc, name)
        if value is not None:
            return name, value
    for name in sorted(k for k in doc if isinstance(k, str) and k.startswith("test_")):
        value = _num(doc, name)
        if value is not None:
            return name, value
    return None, None


@dataclass(frozen=True)
class RoundRecord:
    """What one closed round reported. None means "not reported" (or not a usable value)."""

    round: int
    run_id: str = ""
    devices: tuple[str, ...] = ()
    samples: int | None = None
    train_loss: float | None = None
    test_metric: str | None = None  # e.g. "test_mse"
    test_value: float | None = None
    wall_s: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    rejected: int | None = None  # how many updates were refused this round
    rejected_devices: tuple[str, ...] = ()  # when the aggregator names them
    deadline_extensions: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_doc(cls, doc: Any) -> "RoundRecord":
        """Parse one metrics object; raises ValueError only when it has no usable `round`."""
        if not isinstance(doc, dict):
            raise ValueError("a round record must be a JSON object")
        rnd = doc.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise ValueError(f"a round record needs a non-negative integer 'round', got {rnd!r:.40}")
        name, value = pick_test_metric(doc)
        raw_rejected = doc.get("rejected")
        rejected_devices = _device_ids(raw_rejected)
        if isinstance(raw_rejected, list):
            rejected = len(raw_rejected)
        else:
            rejected = _count(doc, "rejected")
        run_id = doc.get("run_id")
        return cls(
            round=rnd,
            run_id=run_id if isinstance(run_id, str) and len(run_id) <= 64 else "",
            devices=_device_ids(doc.get("devices")),
            samples=_count(doc, "samples"),
            train_loss=_num(doc, "train_loss"),
            test_metric=name,
            test_value=value,
            wall_s=_num(doc, "wall_s"),
            bytes_in=_count(doc, "bytes_in"),
            bytes_out=_count(doc, "bytes_out"),
            rejected=rejected,
            rejected_devices=rejected_devices,
            deadline_extensions=_count(doc, "deadline_extensions"),
            epsilon=_num(doc, "epsilon"),
            delta=_num(doc, "delta"),
            extra={k: v for k, v in doc.items() if k not in _KNOWN and k != name},
        )

    def to_json(self) -> dict[str, Any]:
        """A flat JSON object for `monitor --json`: the test metric under its own name."""
        out: dict[str, Any] = {"round": self.round, "run_id": self.run_id, "devices": list(self.devices), "samples": self.samples, "train_loss": self.train_loss}
        if self.test_metric:
            out[self.test_metric] = self.test_value
        out["test_metric"] = self.test_metric
        out.update(wall_s=self.wall_s, bytes_in=self.bytes_in, bytes_out=self.bytes_out, rejected=self.rejected, deadline_extensions=self.deadline_extensions)
        if self.epsilon is not None:
            out.update(epsilon=self.epsilon, delta=self.delta)
        return out


@dataclass(frozen=True)
class RoundLog:
    """The rounds of the latest run in a round log, one per round number, in order."""

    path: Path
    rounds: tuple[RoundRecord, ...]
    run_id: str = ""
    torn_tail: bool = False  # the last line was cut short (the aggregator died mid-write)
    bad_lines: tuple[int, ...] = ()  # 1-based line numbers skipped as unreadable
    other_runs: int = 0  # earlier runs found in the same file and left out

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
            shown = ", ".join(str(n) for n in self.bad_lines[:10])
            out.append(f"{self.path}: skipped {len(self.bad_lines)} unreadable line(s): {shown}{' ...' if len(self.bad_lines) > 10 else ''}")
        if self.other_runs:
            out.append(f"{self.path}: holds {self.other_runs} earlier run(s); only the latest (run {self.run_id[:8]}) is reported")
        return out


def read_round_log(path: str | Path) -> RoundLog:
    """Read `rounds.jsonl`. Raises FileNotFoundError; an empty result is the caller's call.

    A last line without its newline that does not parse is a torn write (the aggregator
    appends line by line and may die mid-line): it is dropped and flagged. Any other
    unreadable line is skipped and listed. A round logged twice (the aggregator restarted
    and closed it again) keeps its last record. Only the latest run_id is reported: a log
    that spans runs would otherwise mix round 1 of one run with round 1 of the next.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    if ends_with_newline:
        lines.pop()  # the empty string after the final newline
    records: list[RoundRecord] = []
    bad: list[int] = []
    torn = False
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = RoundRecord.from_doc(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
            if i == len(lines) and not ends_with_newline:
                torn = True
            else:
                bad.append(i)
            continue
        records.append(record)
    run_ids = [r.run_id for r in records if r.run_id]
    latest = run_ids[-1] if run_ids else ""
    other_runs = len(set(run_ids) - {latest})
    by_round: dict[int, RoundRecord] = {}
    for r in records:
        if latest and r.run_id and r.run_id != latest:
            continue
        by_round[r.round] = r
    rounds = tuple(by_round[k] for k in sorted(by_round))
    return RoundLog(path, rounds, latest, torn, tuple(bad), other_runs)

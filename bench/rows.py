"""One row format for every benchmark: what was measured, the baseline it is compared with
(measured in the same run, on the same machine, moments apart), their ratio, the goal, and the
load average at the time.

Why ratios: this VM is shared and its load swings from 0.5 to 14 within an hour; an absolute
number measured at load 10 says little, a ratio against a baseline measured in the same minute
says what fleetlearn adds. Every script prints its rows as `ROW {json}` lines on stdout (beside
its own detail); `bench/run_all.py` collects them into one table.

Byte figures say what they count in `what` (e.g. "UPDATE frame bytes per device per round,
header + meta + body"), never a bare "bytes".
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

ROW_PREFIX = "ROW "


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages, rounded for printing."""
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


@dataclass(frozen=True)
class Row:
    """One benchmark figure against its same-run baseline.

    `ratio` is value / baseline, so its meaning depends on the unit: for times and bytes lower is
    better, for rates higher is better; `goal` states the target in the ratio's terms
    (e.g. "<= 1.2x", ">= 0.5x", "< 2 ms" when the goal is absolute).
    """

    bench: str  # the script, e.g. "bench_ingest"
    what: str  # what the value counts, precisely
    value: float
    unit: str  # "ms", "updates/s", "GB/s", "bytes", "MB", ...
    baseline_what: str = ""  # what the baseline counts; "" when the row has no baseline
    baseline: float | None = None
    goal: str = ""
    met: bool | None = None  # None when the goal is not decidable from this row alone
    load: tuple[float, float, float] = field(default_factory=load_average)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return doc


def emit(row: Row) -> Row:
    """Print `row` as one `ROW {json}` line (flushed: run_all reads the pipe as it goes)."""
    sys.stdout.write(ROW_PREFIX + json.dumps(row.to_doc(), sort_keys=True) + "\n")
    sys.stdout.flush()
    return row


def parse_rows(text: str) -> list[dict[str, Any]]:
    """Every `ROW {json}` line in `text`, in order (other lines are the scripts' detail)."""
    return [json.loads(line[len(ROW_PREFIX) :]) for line in text.splitlines() if line.startswith(ROW_PREFIX)]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one markdown table, the form docs/benchmarks.md quotes."""

    def num(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
        return f"{x:,}" if isinstance(x, int) else str(x)

    lines = [
        "| bench | what | value | baseline (same run) | ratio | goal | met | load 1/5/15 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = f"{num(r['baseline'])} {r['unit']} ({r['baseline_what']})" if r.get("baseline") is not None else "-"
        ratio = f"{r['ratio']:.3f}x" if r.get("ratio") is not None else "-"
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        load = "/".join(f"{x:.1f}" for x in r["load"])
        lines.append(
            f"| {r['bench']} | {r['what']} | {num(r['value'])} {r['unit']} | {base} | {ratio} | {r['goal']} | {met} | {load} |"
        )
    return "\n".join(lines)

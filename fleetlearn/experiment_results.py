"""What `fleetlearn experiment` measures and writes: per run, per cell, results.csv/.md.

A *run* is one (strategy, partition, seed): one aggregator, N devices, its own state dir. A
*cell* is a (strategy, partition) pair, its runs over the grid's seeds. Per cell:

  final metric   mean over the seeds of the last round's test metric, with a 95% Student-t
                 interval: mean ± t(0.975, n-1) · s / sqrt(n), s the sample standard deviation
                 (ddof 1); n = the seeds whose run finished. With one seed there is no interval.
  rounds-to-target  per seed, the first round whose metric reaches the target (>= for accuracy,
                 <= for mse and loss), or none; the mean is over the seeds that reached it and
                 is shown with how many did ("12.5 (2/3)").
  central        the same bundle (same seed's initial weights) trained centrally for
                 rounds x local_epochs epochs with the same optimizer and schedule
                 (local_fleet.central_baseline), mean and interval over the same seeds.

The round log is read in one place, `read_metric_series`, through the one reader of
rounds.jsonl (aggregator/round_log.py: RoundMetrics records of the latest run).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Two-sided 95% critical values t(0.975, df) for df = 1..30 (the Student t quantile, as
# scipy.stats.t.ppf(0.975, df) gives; tests compare when scipy is installed).
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
         2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
         2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
         2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)  # fmt: skip
# Beyond 30: linear in 1/df between these (error < 1e-3), the normal quantile in the limit.
_T975_TAIL = ((30, 2.042272456), (40, 2.021075390), (60, 2.000297822), (120, 1.979930405), (math.inf, 1.959963985))


def t_critical_975(df: int) -> float:
    """t(0.975, df), the two-sided 95% Student-t critical value."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= 30:
        return _T975[df - 1]
    for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:]):
        if df <= d1:
            w = (1 / d0 - 1 / df) / (1 / d0 - (0 if d1 == math.inf else 1 / d1))
            return t0 + w * (t1 - t0)
    return _T975_TAIL[-1][1]


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float | None
    low: float | None  # None when n < 2
    high: float | None


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval of `values` (see the module docstring)."""
    n = len(values)
    if n == 0:
        return Interval(0, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(1, mean, None, None)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical_975(n - 1) * s / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half)


def read_metric_series(state_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(round, value of `metric`) for each round of the latest run in STATE_DIR/rounds.jsonl,
    in round order; rounds that did not report the metric are left out. The only place the
    experiment reads a round log."""
    from fleetlearn.aggregator.round_log import ROUND_LOG, read_round_log

    out = []
    for r in read_round_log(state_dir / ROUND_LOG).rounds:
        value = r.test_value if r.test_metric == metric else r.extra.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((r.round, float(value)))
    return out


def rounds_to_target(series: Sequence[tuple[int, float]], target: float, higher_is_better: bool) -> int | None:
    """The first round whose value reaches `target`, or None."""
    for rnd, value in series:
        if (value >= target) if higher_is_better else (value <= target):
            return rnd
    return None


@dataclass
class RunResult:
    strategy: str
    partition: str
    seed: int
    status: str  # "ok" | "failed"
    reason: str = ""
    rounds: int = 0  # rounds logged
    final: float | None = None
    rounds_to_target: int | None = None
    central: float | None = None
    wall_s: float = 0.0
    dir: str = ""


@dataclass
class Cell:
    strategy: str
    partition: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "ok"]

    def final(self) -> Interval:
        return t_interval([r.final for r in self.ok if r.final is not None])

    def central(self) -> Interval:
        return t_interval([r.central for r in self.ok if r.central is not None])

    def rtt_mean(self) -> float | None:
        reached = [r.rounds_to_target for r in self.ok if r.rounds_to_target is not None]
        return math.fsum(reached) / len(reached) if reached else None

    def reached(self) -> int:
        return sum(r.rounds_to_target is not None for r in self.ok)


def cells(runs: Sequence[RunResult]) -> list[Cell]:
    """Runs grouped into cells, in the order their first run appears."""
    out: dict[tuple[str, str], Cell] = {}
    for r in runs:
        out.setdefault((r.strategy, r.partition), Cell(r.strategy, r.partition)).runs.append(r)
    return list(out.values())


def _g(v: float | int | None) -> str:
    return "" if v is None else (str(v) if isinstance(v, int) else repr(float(v)))


CSV_COLUMNS = ("strategy", "partition", "metric", "seeds", "ok_seeds", "final_mean", "final_ci95_low", "final_ci95_high",
               "final_per_seed", "target", "rounds_to_target_per_seed", "rounds_to_target_mean", "reached_target",
               "central_mean", "central_ci95_low", "central_ci95_high", "federated_over_central", "failures")  # fmt: skip


def results_csv(runs: Sequence[RunResult], metric: str, target: float) -> str:
    """One row per cell; per-seed lists are ';'-joined in seed order (empty = failed / not reached)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for c in cells(runs):
        f, cen = c.final(), c.central()
        ratio = f.mean / cen.mean if f.mean is not None and cen.mean else None
        w.writerow([c.strategy, c.partition, metric, len(c.runs), len(c.ok), _g(f.mean), _g(f.low), _g(f.high),
                    ";".join(_g(r.final) for r in c.runs), _g(target), ";".join(_g(r.rounds_to_target) for r in c.runs),
                    _g(c.rtt_mean()), c.reached(), _g(cen.mean), _g(cen.low), _g(cen.high), _g(ratio),
                    " | ".join(f"seed {r.seed}: {r.reason}" for r in c.runs if r.status != "ok")])  # fmt: skip
    return buf.getvalue()


RUNS_COLUMNS = (
    "strategy",
    "partition",
    "seed",
    "status",
    "rounds",
    "final",
    "rounds_to_target",
    "central",
    "wall_s",
    "dir",
    "reason",
)


def runs_csv(runs: Sequence[RunResult]) -> str:
    """One row per run (the raw numbers behind results.csv)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUNS_COLUMNS)
    for r in runs:
        w.writerow([r.strategy, r.partition, r.seed, r.status, r.rounds, _g(r.final), _g(r.rounds_to_target), _g(r.central),
                    f"{r.wall_s:.1f}", r.dir, r.reason])  # fmt: skip
    return buf.getvalue()


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _interval(i: Interval, digits: int) -> str:
    if i.mean is None:
        return "—"
    if i.low is None:
        return f"{i.mean:.{digits}f} (1 seed)"
    return f"{i.mean:.{digits}f} [{i.low:.{digits}f}, {i.high:.{digits}f}]"


def results_markdown(
    runs: Sequence[RunResult], *, title: str, setup: str, metric: str, target: float, higher_is_better: bool
) -> str:
    """The tables of results.md: one row per cell, then the failures (if any)."""
    digits = 4 if metric == "test_accuracy" else 3
    cmp = "≥" if higher_is_better else "≤"
    lines = [f"# {title}", "", setup, "",
             f"Final {metric}: mean over seeds [95% Student-t interval]. Rounds to {metric} {cmp} {target:g}: per seed "
             "(— = not reached), then the mean over the seeds that reached it (reached/ran). Central: the same model, "
             "initial weights and optimizer trained on all the data for rounds × local_epochs epochs.", "",
             f"| strategy | partition | final {metric} | rounds to target (per seed) | mean rounds to target | central {metric} | federated / central |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    failures = []
    for c in cells(runs):
        f, cen = c.final(), c.central()
        per_seed = ", ".join(
            "failed" if r.status != "ok" else ("—" if r.rounds_to_target is None else str(r.rounds_to_target)) for r in c.runs
        )
        rtt = c.rtt_mean()
        mean_rtt = "—" if rtt is None else f"{rtt:.1f} ({c.reached()}/{len(c.ok)})"
        ratio = _fmt(f.mean / cen.mean, 3) if f.mean is not None and cen.mean else "—"
        lines.append(
            f"| {c.strategy} | {c.partition} | {_interval(f, digits)} | {per_seed} | {mean_rtt} | {_interval(cen, digits)} | {ratio} |"
        )
        failures += [
            f"- {r.strategy} / {r.partition} / seed {r.seed}: {r.reason} (logs: `{r.dir}`)" for r in c.runs if r.status != "ok"
        ]
    if failures:
        lines += ["", "## Failed runs", "", *failures]
    return "\n".join(lines) + "\n"

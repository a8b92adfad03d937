"""Plots and a summary table from an aggregator's round log (STATE_DIR/rounds.jsonl).

Writes to --out: metrics.png (test metric and train loss per round), participation.png
(which device counted in which round), wall_time.png (seconds per round) and report.md,
a markdown summary with one table row per round that links the three plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("state_dir", metavar="STATE_DIR", help="the aggregator's state directory (holds rounds.jsonl)")
    parser.add_argument("--out", required=True, help="directory to write the PNGs and report.md into (created if missing)")


def write_report(state_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the report for `state_dir` into `out_dir`; returns the path of report.md.

    Raises UsageError (one line) when the round log is missing, unreadable or holds no
    round. A torn last line is tolerated: it is left out and named in report.md.
    """
    return _write(state_dir, out_dir)[0]


def _write(state_dir: str | Path, out_dir: str | Path) -> tuple[Path, list[str]]:
    """write_report, also returning the round log's warnings for the command to print."""
    from fleetlearn.aggregator.round_log import ROUND_LOG, read_round_log

    log_path = Path(state_dir) / ROUND_LOG
    try:
        log = read_round_log(log_path)
    except FileNotFoundError:
        raise UsageError(
            f"{log_path}: no round log (is {state_dir} an aggregator state dir, and has a round closed yet?)"
        ) from None
    except OSError as exc:
        raise UsageError(f"{log_path}: unreadable ({exc.strerror or exc})") from None
    if not log.rounds:
        extra = "; its only line is torn" if log.torn_tail else ""
        raise UsageError(f"{log_path}: the round log holds no complete round{extra}")

    # report_plots renders through the Agg canvas directly and never touches pyplot, so no
    # matplotlib.use("Agg") here: that would switch the backend of a caller (the demo).
    from fleetlearn.report_markdown import render_markdown
    from fleetlearn.report_plots import plot_metrics, plot_participation, plot_wall_time, save

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create ({exc.strerror or exc})") from None
    rounds = log.rounds
    images = {
        "metrics": save(plot_metrics(rounds, log.test_metric), out / "metrics.png"),
        "participation": save(plot_participation(rounds), out / "participation.png"),
        "wall_time": save(plot_wall_time(rounds), out / "wall_time.png"),
    }
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(log, {k: p.name for k, p in images.items()}), encoding="utf-8")
    tmp.replace(report)  # a reader never sees half a report
    return report, log.warnings()


def run(args: argparse.Namespace) -> int:
    report, warnings = _write(args.state_dir, args.out)
    for warning in warnings:
        print(f"fleetlearn report: warning: {warning}", file=sys.stderr)
    print(report)
    return 0

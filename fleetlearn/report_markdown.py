"""report.md: headline numbers, the plots, one table row per round, participation per device."""

from __future__ import annotations

from fleetlearn.aggregator.round_log import RoundLog
from fleetlearn.edge_runtime.core.protocol import RoundMetrics


def _cell(value: object) -> str:
    """A table cell: '-' for missing, pipes escaped (a device id read from a file is data)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _better_is_higher(metric: str | None) -> bool:
    return bool(metric) and "accuracy" in metric  # type: ignore[operator]


def _headline(log: RoundLog) -> list[str]:
    rounds, metric = log.rounds, log.test_metric
    lines = []
    scored = [r for r in rounds if r.test_metric == metric and r.test_value is not None]
    if scored:
        first, last = scored[0], scored[-1]
        pick = max if _better_is_higher(metric) else min
        best = pick(scored, key=lambda r: r.test_value)  # type: ignore[arg-type, return-value]
        lines.append(
            f"- **{metric}**: {first.test_value:.4g} after round {first.round} -> {last.test_value:.4g} after round {last.round}; best {best.test_value:.4g} (round {best.round})"
        )
    losses = [r for r in rounds if r.train_loss is not None]
    if losses:
        lines.append(f"- **train loss**: {losses[0].train_loss:.4g} -> {losses[-1].train_loss:.4g}")
    devices = sorted({d for r in rounds for d in r.devices})
    if devices:
        mean = sum(len(r.devices) for r in rounds) / len(rounds)
        lines.append(f"- **devices**: {len(devices)} took part; {mean:.1f} counted per round on average")
    walls = [r.wall_s for r in rounds if r.wall_s is not None]
    if walls:
        lines.append(
            f"- **wall time**: {sum(walls):.1f} s in total, {sorted(walls)[len(walls) // 2]:.3g} s median per round, {max(walls):.3g} s slowest"
        )
    b_in = [r.bytes_in for r in rounds if r.bytes_in is not None]
    b_out = [r.bytes_out for r in rounds if r.bytes_out is not None]
    if b_in or b_out:
        lines.append(
            f"- **traffic at the aggregator**: {_bytes(sum(b_in)) if b_in else '-'} in, {_bytes(sum(b_out)) if b_out else '-'} out"
        )
    rejected = sum(r.rejected or 0 for r in rounds)
    extended = sum(1 for r in rounds if r.deadline_extensions)
    if rejected or extended:
        lines.append(f"- **trouble**: {rejected} update(s) rejected; {extended} round(s) needed a deadline extension")
    dp = [r for r in rounds if r.epsilon is not None]
    if dp:
        lines.append(
            f"- **differential privacy**: epsilon {dp[-1].epsilon:.4g} spent by round {dp[-1].round}"
            + (f" (delta {dp[-1].delta:.3g})" if dp[-1].delta is not None else "")
        )
    return lines


def _round_row(r: RoundMetrics, metric: str | None, with_dp: bool) -> str:
    cells = [
        r.round,
        len(r.devices),
        ", ".join(r.devices),
        r.samples,
        r.train_loss,
        r.test_value if r.test_metric == metric else None,
        r.wall_s,
        _bytes(r.bytes_in),
        _bytes(r.bytes_out),
        r.rejected,
        r.deadline_extensions,
    ]
    if with_dp:
        cells.append(r.epsilon)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_markdown(log: RoundLog, images: dict[str, str]) -> str:
    """The whole report.md; `images` maps metrics/participation/wall_time to file names."""
    rounds, metric = log.rounds, log.test_metric
    with_dp = any(r.epsilon is not None for r in rounds)
    out = [
        "# fleetlearn report",
        "",
        f"Round log `{log.path}`"
        + (f", run `{log.run_id}`" if log.run_id else "")
        + f": {len(rounds)} rounds ({rounds[0].round} to {rounds[-1].round}).",
        "",
    ]
    for warning in log.warnings():
        out += [f"> **Note:** {warning}", ""]
    out += ["## Summary", "", *_headline(log), ""]
    out += [
        "## Plots",
        "",
        f"![{metric or 'test metric'} and train loss per round]({images['metrics']})",
        "",
        f"![participation per device per round]({images['participation']})",
        "",
        f"![wall time per round]({images['wall_time']})",
        "",
    ]
    header = [
        "round",
        "devices",
        "participants",
        "samples",
        "train loss",
        metric or "test metric",
        "wall s",
        "bytes in",
        "bytes out",
        "rejected",
        "deadline ext.",
    ]
    if with_dp:
        header.append("epsilon")
    out += [
        "## Rounds",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h not in ("participants",) else "---" for h in header) + "|",
    ]
    out += [_round_row(r, metric, with_dp) for r in rounds]
    devices = sorted({d for r in rounds for d in r.devices})
    if devices:
        out += ["", "## Participation per device", "", "| device | rounds counted | missed rounds |", "|---|---:|---|"]
        for d in devices:
            missed = [str(r.round) for r in rounds if d not in r.devices]
            shown = ", ".join(missed[:20]) + (f" (+{len(missed) - 20} more)" if len(missed) > 20 else "")
            out.append(f"| {_cell(d)} | {len(rounds) - len(missed)} of {len(rounds)} | {shown or '-'} |")
    return "\n".join(out) + "\n"

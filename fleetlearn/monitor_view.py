"""Render a FleetState as a rich renderable: header, device summary, devices, rounds, trend.

Pure functions of (state, now): the live loop calls `render` a few times a second, tests can
render to a string console. Nothing here reads the network or the clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fleetlearn.edge_runtime.core.protocol import Health
from fleetlearn.monitor_state import DeviceView, FleetState, RoundView

BLOCKS = "▁▂▃▄▅▆▇█"
DEVICE_STYLE = {
    "idle": "green",
    "fetching": "cyan",
    "training": "yellow",
    "uploading": "blue",
    "error": "bold red",
    "offline": "dim red",
    "ineligible": "dark_orange",
    "unknown": "dim",
}
ROUND_STYLE = {"open": "bold yellow", "closed": "green", "finished": "bold green", "failed": "bold red"}


def sparkline(values: Iterable[float], width: int = 60) -> str:
    """Unicode block sparkline of the last `width` values, scaled between their min and max."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return BLOCKS[len(BLOCKS) // 2] * len(vals)
    scale = (len(BLOCKS) - 1) / (hi - lo)
    return "".join(BLOCKS[int(round((v - lo) * scale))] for v in vals)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def health_text(h: Health | None) -> str:
    """`61.2C ac rss 48.0 MB disk 3.1 GB up 2.0h`: the readings a device sent, absent ones left out."""
    if h is None:
        return "-"
    parts = []
    if h.cpu_temp_c is not None:
        parts.append(f"{h.cpu_temp_c:.1f}C")
    if h.power_source is not None:
        parts.append(h.power_source)
    if h.rss_bytes is not None:
        parts.append(f"rss {human_bytes(h.rss_bytes)}")
    if h.free_disk_bytes is not None:
        parts.append(f"disk {human_bytes(h.free_disk_bytes)}")
    if h.uptime_s is not None:
        parts.append(f"up {_ago(h.uptime_s)}")
    return " ".join(parts) or "-"


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def header(state: FleetState, now: float, broker: str) -> Text:
    t = Text()
    t.append(f"fleet {state.fleet}", style="bold")
    t.append(f"  broker {broker}  ")
    if state.connected:
        t.append("● connected", style="green")
    else:
        t.append("○ reconnecting", style="bold red")
        if state.link_error:
            t.append(f" ({state.link_error})", style="red")
    if state.run_id:
        t.append(f"  run {state.run_id[:8]}", style="dim")
    t.append("\n")
    current = state.current_round()
    if current is None:
        t.append("no round yet (waiting for the aggregator's retained round state)", style="dim")
        return t
    total_rounds = current.total_rounds or state.total_rounds
    if current.state == "finished":
        # The aggregator announces the end as round N+1 "finished": there is no such round.
        t.append(f"run finished after {total_rounds or current.round - 1} rounds", style=ROUND_STYLE["finished"])
        return t
    total = f"/{total_rounds}" if total_rounds else ""
    t.append(f"round {current.round}{total}  ", style="bold")
    t.append(current.state, style=ROUND_STYLE.get(current.state, ""))
    left = current.seconds_left(now)
    if left is not None:
        t.append(
            f"  closes in {left:.0f}s" if left >= 0 else f"  deadline passed {-left:.0f}s ago",
            style="yellow" if left >= 0 else "red",
        )
    t.append(f"  accepted {current.accepted}")
    if current.target_devices or current.min_devices:
        t.append(f" (min {current.min_devices}, target {current.target_devices})")
    if current.reason:
        t.append(f"  {current.reason}", style="dim")
    return t


def summary(state: FleetState) -> Text:
    c = state.counts()
    t = Text()
    for label, value, style in (
        ("online", c.online, "green"),
        ("training", c.training, "yellow"),
        ("ineligible", c.ineligible, "dark_orange"),
        ("uploaded", c.uploaded, "blue"),
        ("late", c.late, "magenta"),
        ("offline", c.offline, "red"),
    ):
        t.append(f"{label} ", style="bold")
        t.append(f"{value}", style=style)
        t.append("   ")
    t.append(f"({c.total} devices seen", style="dim")
    if state.late_round is not None:
        t.append(f"; late = in round {state.late_round}", style="dim")
    if state.ignored:
        t.append(f"; {state.ignored} bad messages ignored", style="dim")
    t.append(")", style="dim")
    return t


def _device_phase(dev: DeviceView, current: RoundView | None, late_view: RoundView | None) -> str:
    if not dev.online:
        return ""
    if current and dev.device_id in current.uploaded:
        return f"uploaded r{current.round}"
    if late_view and dev.device_id in late_view.late:
        return f"late r{late_view.round}"
    return ""


def devices_table(state: FleetState, now: float, limit: int = 20) -> Table:
    table = Table(title="devices", expand=True, title_justify="left")
    for col in ("device", "state", "round", "this round", "uploads", "late", "last seen", "health", "detail"):
        table.add_column(col, no_wrap=col != "detail", overflow="ellipsis")
    current = state.current_round()
    late_view = state.rounds.get(state.late_round) if state.late_round is not None else None
    # Online devices first, then by id: the ones that need attention are the live ones.
    devices = sorted(state.devices.values(), key=lambda d: (not d.online, d.device_id))
    for dev in devices[:limit]:
        table.add_row(
            dev.device_id,
            Text(dev.state, style=DEVICE_STYLE.get(dev.state, "")),
            str(dev.round or "-"),
            _device_phase(dev, current, late_view),
            str(dev.uploads),
            str(dev.late_rounds),
            _ago(now - dev.seen) if dev.seen else "-",
            health_text(dev.health),
            dev.detail,
        )
    if len(devices) > limit:
        table.caption = f"{len(devices) - limit} more not shown"
    return table


def rounds_table(state: FleetState, n: int) -> Table:
    name, _ = state.trend()
    table = Table(title=f"last {n} rounds", expand=True, title_justify="left")
    for col in (
        "round",
        "state",
        "devices",
        "participants",
        "samples",
        "train loss",
        name or "test",
        "wall s",
        "bytes in",
        "bytes out",
        "late",
    ):
        table.add_column(
            col,
            no_wrap=col != "participants",
            justify="right" if col not in ("state", "participants") else "left",
            overflow="ellipsis",
        )
    for view in reversed(state.recent_rounds(n)):
        m = view.metrics
        participants = list(m.devices) if m and m.devices else sorted(view.uploaded)
        table.add_row(
            str(view.round),
            Text(view.state, style=ROUND_STYLE.get(view.state, "")),
            str(len(participants)),
            ", ".join(participants),
            str(m.samples) if m and m.samples is not None else "-",
            _num(m.train_loss if m else None),
            _num(m.test_value if m and m.test_metric == name else None),
            _num(m.wall_s if m else None, ".2f"),
            human_bytes(m.bytes_in if m else None),
            human_bytes(m.bytes_out if m else None),
            ", ".join(sorted(view.late)) or "-",
        )
    return table


def trend(state: FleetState) -> Text:
    name, values = state.trend()
    if not values:
        return Text("no round metrics yet", style="dim")
    t = Text(f"{name} ", style="bold")
    t.append(sparkline(values), style="cyan")
    best = max(values) if name and "accuracy" in name else min(values)
    t.append(f"  last {values[-1]:.4g}  best {best:.4g}  ({len(values)} rounds)")
    return t


def render(state: FleetState, now: float, broker: str, rounds: int = 10) -> RenderableType:
    """The whole screen as a Layout: fixed-height header and trend, tables in between."""
    layout = Layout()
    layout.split_column(
        Layout(
            Panel(Group(header(state, now, broker), summary(state)), title="fleetlearn monitor", border_style="blue"),
            name="head",
            size=5,
        ),
        Layout(devices_table(state, now), name="devices", ratio=1),
        Layout(rounds_table(state, rounds), name="rounds", ratio=1),
        Layout(Panel(trend(state), title="test metric trend"), name="trend", size=3),
    )
    return layout

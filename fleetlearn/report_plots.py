"""The report's figures, one function each, from a run's RoundMetricss.

Each function returns a matplotlib Figure built directly (Figure + Agg canvas), never through
pyplot: pyplot keeps global figure state, and a report written at the end of a demo must not
touch the caller's plotting. Returning the Figure lets tests inspect the data behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fleetlearn.edge_runtime.core.protocol import RoundMetrics

ABSENT, REJECTED, COUNTED = 0.0, 0.5, 1.0


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    return fig


def _series(rounds: Sequence[RoundMetrics], attr: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        v = getattr(r, attr)
        if v is not None:
            xs.append(r.round)
            ys.append(float(v))
    return xs, ys


def plot_metrics(rounds: Sequence[RoundMetrics], test_metric: str | None) -> Figure:
    """Test metric (top) and mean train loss (bottom) per round, sharing the round axis.

    Two panels, not twin axes: accuracy and a loss live on unrelated scales, and one reader
    misreads a twin axis for every two who read it right.
    """
    fig = _figure(8, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs, ys = _series([r for r in rounds if r.test_metric == test_metric], "test_value")
    top.plot(xs, ys, marker="o", color="tab:blue", label=test_metric or "test metric")
    top.set_ylabel(test_metric or "test metric")
    top.set_title(f"{test_metric or 'test metric'} of the global model after each round")
    if ys:
        best = int(np.argmax(ys) if test_metric and "accuracy" in test_metric else np.argmin(ys))
        top.annotate(
            f"best {ys[best]:.4g}", (xs[best], ys[best]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8
        )
        _log_scale_if_wide(top, ys)
    top.grid(alpha=0.3)
    xs, ys = _series(rounds, "train_loss")
    bottom.plot(xs, ys, marker="o", color="tab:orange", label="train loss")
    _log_scale_if_wide(bottom, ys)
    bottom.set_ylabel("train loss (sample-weighted mean)")
    bottom.set_xlabel("round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    bottom.grid(alpha=0.3)
    return fig


def _log_scale_if_wide(ax, ys: list[float]) -> None:
    """A loss that falls by orders of magnitude is a flat line on a linear axis after round 3."""
    if ys and min(ys) > 0 and max(ys) / min(ys) > 50:
        ax.set_yscale("log")


def participation_matrix(rounds: Sequence[RoundMetrics]) -> tuple[list[str], np.ndarray]:
    """Devices (sorted) x rounds (in order): COUNTED, REJECTED or ABSENT per cell."""
    devices = sorted({d for r in rounds for d in (*r.devices, *r.rejected_devices)})
    index = {d: i for i, d in enumerate(devices)}
    m = np.full((len(devices), len(rounds)), ABSENT)
    for j, r in enumerate(rounds):
        for d in r.rejected_devices:
            m[index[d], j] = REJECTED
        for d in r.devices:
            m[index[d], j] = COUNTED
    return devices, m


def plot_participation(rounds: Sequence[RoundMetrics]) -> Figure:
    """Heat map: which device's update was counted in which round (rows devices, columns rounds)."""
    devices, m = participation_matrix(rounds)
    fig = _figure(max(6.0, 0.25 * len(rounds) + 3), max(2.5, 0.3 * len(devices) + 1.5))
    ax = fig.subplots()
    cmap = ListedColormap(["#eeeeee", "#f4a261", "#2a9d8f"])  # absent, rejected, counted
    ax.imshow(
        m if m.size else np.zeros((1, max(1, len(rounds)))), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1
    )
    ax.set_yticks(range(len(devices)), devices, fontsize=8)
    step = max(1, len(rounds) // 20)  # keep round labels readable on long runs
    ticks = list(range(0, len(rounds), step))
    ax.set_xticks(ticks, [str(rounds[i].round) for i in ticks], fontsize=8)
    ax.set_xlabel("round")
    ax.set_title("participation: green counted, orange rejected, grey absent")
    return fig


def plot_wall_time(rounds: Sequence[RoundMetrics]) -> Figure:
    """Wall time per round as bars; rounds whose deadline was extended are marked."""
    fig = _figure(8, 3.5)
    ax = fig.subplots()
    xs, ys = _series(rounds, "wall_s")
    extended = {r.round for r in rounds if r.deadline_extensions}
    colors = ["tab:red" if x in extended else "tab:gray" for x in xs]
    ax.bar(xs, ys, color=colors)
    if ys:
        ax.axhline(float(np.median(ys)), color="black", lw=0.8, ls="--", label=f"median {np.median(ys):.3g} s")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("wall time (s)")
    ax.set_title("round wall time" + (" (red: deadline extended)" if extended else ""))
    ax.grid(axis="y", alpha=0.3)
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path

"""`fleetlearn report`: plots and report.md from a recorded round log."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator.round_log import read_round_log
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.report import write_report
from fleetlearn.report_plots import COUNTED, REJECTED, plot_metrics, plot_participation, plot_wall_time
from tests.conftest import ROOT

PY = sys.executable
RUN = "f" * 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVICES = ["pi-01", "pi-02", "pi-03"]


def round_doc(r: int, devices: list[str], **extra) -> dict:
    """A round record shaped like the aggregator's: counts, losses, bytes, timings, extras."""
    return {
        "v": 1,
        "round": r,
        "run_id": RUN,
        "devices": devices,
        "samples": 135 * len(devices),
        "train_loss": round(80.0 / r, 4),
        "test_mse": round(60.0 / r + 10, 4),
        "wall_s": 0.8 + 0.05 * r,
        "bytes_in": 9_000 * len(devices),
        "bytes_out": 27_000,
        "rejected": 0,
        "deadline_extensions": 0,
        "model_hash": "c" * 64,  # an extra field the report does not know: tolerated
        **extra,
    }


@pytest.fixture
def state_dir(tmp_path) -> Path:
    """5 rounds x 3 devices; pi-02 missed round 3 (its deadline was extended); a torn tail."""
    d = tmp_path / "state"
    d.mkdir()
    lines = []
    for r in range(1, 6):
        devices = [x for x in DEVICES if not (r == 3 and x == "pi-02")]
        extra = {"deadline_extensions": 1} if r == 3 else {}
        lines.append(json.dumps(round_doc(r, devices, **extra)))
    torn = json.dumps(round_doc(6, DEVICES))[:37]  # the aggregator died mid-append
    (d / "rounds.jsonl").write_text("\n".join(lines) + "\n" + torn)
    return d


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_round_log_reader_tolerates_a_torn_tail(state_dir):
    log = read_round_log(state_dir / "rounds.jsonl")
    assert [r.round for r in log.rounds] == [1, 2, 3, 4, 5]
    assert log.torn_tail and not log.bad_lines and log.run_id == RUN
    assert log.test_metric == "test_mse"
    assert log.rounds[2].devices == ("pi-01", "pi-03") and log.rounds[2].deadline_extensions == 1
    assert log.rounds[0].extra == {"model_hash": "c" * 64}
    assert any("torn" in w for w in log.warnings())


def test_round_log_reader_skips_bad_lines_keeps_last_duplicate_and_latest_run(tmp_path):
    old = json.dumps(round_doc(1, DEVICES, run_id="e" * 32))
    lines = [
        old,
        json.dumps(round_doc(1, DEVICES)),
        "not json",
        json.dumps(round_doc(2, DEVICES, test_mse=5.0)),
        json.dumps(round_doc(2, DEVICES, test_mse=4.0)),
        "[]",
        "",
    ]
    p = tmp_path / "rounds.jsonl"
    p.write_text("\n".join(lines) + "\n")
    log = read_round_log(p)
    assert [r.round for r in log.rounds] == [1, 2] and log.rounds[1].test_value == 4.0
    assert log.bad_lines == (3, 6) and not log.torn_tail and log.other_runs == 1


def test_plots_hold_the_data_of_every_round(state_dir):
    rounds = read_round_log(state_dir / "rounds.jsonl").rounds
    fig = plot_metrics(rounds, "test_mse")
    test_ax, loss_ax = fig.axes
    assert list(test_ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(test_ax.lines[0].get_ydata()) == pytest.approx([60.0 / r + 10 for r in range(1, 6)])
    assert list(loss_ax.lines[0].get_ydata()) == pytest.approx([round(80.0 / r, 4) for r in range(1, 6)])

    fig = plot_participation(rounds)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 5)  # devices x rounds
    assert image[1, 2] == 0 and np.count_nonzero(image == COUNTED) == 14  # pi-02 missed round 3
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == DEVICES

    fig = plot_wall_time(rounds)
    bars = fig.axes[0].patches
    assert len(bars) == 5 and bars[2].get_height() == pytest.approx(0.95)
    assert bars[2].get_facecolor() != bars[0].get_facecolor()  # the extended round stands out


def test_rejected_devices_show_in_the_heat_map():
    from fleetlearn.edge_runtime.core.protocol import RoundMetrics

    rounds = [RoundMetrics.from_doc(round_doc(1, ["a"], rejected=[{"device_id": "b", "reason": "stale"}]))]
    image = plot_participation(rounds).axes[0].images[0].get_array()
    assert image.shape == (2, 1) and image[1, 0] == REJECTED and rounds[0].rejected == 1


def test_write_report(state_dir, tmp_path):
    out = tmp_path / "report"
    md = write_report(state_dir, out)
    assert md == out / "report.md"
    for name in ("metrics.png", "participation.png", "wall_time.png"):
        width, height = png_size(out / name)
        assert width >= 400 and height >= 200 and (out / name).stat().st_size > 5_000
    text = md.read_text()
    for name in ("metrics.png", "participation.png", "wall_time.png"):
        assert f"]({name})" in text
    table = text.split("## Rounds", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| round")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3", "4", "5"]
    assert "| 3 | 2 | pi-01, pi-03 |" in text
    assert "torn" in text and "test_mse" in text
    assert "| pi-02 | 4 of 5 | 3 |" in text


def test_write_report_classification_and_dp(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    docs = []
    for r in range(1, 4):
        doc = round_doc(r, DEVICES, epsilon=0.5 * r, delta=1e-5)
        del doc["test_mse"]
        doc["test_accuracy"] = 0.6 + 0.1 * r
        docs.append(json.dumps(doc))
    (d / "rounds.jsonl").write_text("\n".join(docs) + "\n")
    text = write_report(d, tmp_path / "out").read_text()
    assert "test_accuracy" in text and "best 0.9 (round 3)" in text and "epsilon 1.5" in text


def test_missing_or_empty_log_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no round log"):
        write_report(tmp_path, tmp_path / "out")
    (tmp_path / "rounds.jsonl").write_text("")
    with pytest.raises(UsageError, match="no complete round"):
        write_report(tmp_path, tmp_path / "out")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "fleetlearn.cli", "report", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli(state_dir, tmp_path):
    r = run_cli(str(state_dir), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "out" / "report.md"
    assert "torn" in r.stderr  # the torn tail is reported, and tolerated

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "rounds.jsonl").write_text('{"round": 1, "dev')  # only a torn line
    for state in (tmp_path / "missing", empty):
        r = run_cli(str(state), "--out", str(tmp_path / "out2"))
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("fleetlearn report: error:")

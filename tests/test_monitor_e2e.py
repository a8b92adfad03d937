"""End to end: the real aggregator and two real device processes, watched by the monitor.

The monitor must see rounds advance, see a SIGKILLed device go offline through its Last
Will, and the run's round log must turn into a report with one row per round.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlearn.report import write_report
from tests.conftest import ROOT, stop_process
from tests.test_monitor import MonitorProcess, is_

PY = sys.executable
FLEET = "e2e"
ROUNDS = 5

pytestmark = pytest.mark.mosquitto


def device_config(tmp: Path, broker_url: str, bundle: Path, data: Path, device_id: str) -> Path:
    own_bundle = tmp / f"{device_id}-bundle"
    shutil.copytree(bundle, own_bundle)  # a device may install bundles over the air into its own dir
    cfg = tmp / f"{device_id}.toml"
    cfg.write_text(
        f'device_id = "{device_id}"\nfleet = "{FLEET}"\nbroker = "{broker_url}"\n'
        f'bundle = "{own_bundle}"\ndata = "{data}"\nstate_dir = "{tmp / (device_id + "-state")}"\nkeepalive = 5\n'
        "[training]\nbatch_size = 16\nlocal_epochs = 1\n"
    )
    return cfg


def test_monitor_watches_a_real_run(mosquitto, boston_bundle, boston_shards, tmp_path):
    shards, test_npz = boston_shards
    state = tmp_path / "agg-state"
    monitor = MonitorProcess(mosquitto.url, FLEET, tmp_path)
    procs: dict[str, subprocess.Popen] = {}
    try:
        monitor.wait_for(is_("connected"), what="connected")
        for i, dev in enumerate(("dev-1", "dev-2")):
            cfg = device_config(tmp_path, mosquitto.url, boston_bundle, shards[i], dev)
            procs[dev] = subprocess.Popen(
                [PY, "-m", "fleetlearn.cli", "device", "--config", str(cfg)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{dev}.log", "wb"),
            )

        # Both devices up before round 1 opens, so the first rounds close at their target (2)
        # and not at the short deadline, however slowly the devices start on a busy machine.
        for dev in ("dev-1", "dev-2"):
            monitor.wait_for(is_("device", device_id=dev, state="idle"), timeout=60, what=f"{dev} online")
        procs["agg"] = subprocess.Popen(
            [
                PY,
                "-m",
                "fleetlearn.cli",
                "aggregator",
                "--broker",
                mosquitto.url,
                "--fleet",
                FLEET,
                "--bundle",
                str(boston_bundle),
                "--state-dir",
                str(state),
                "--rounds",
                str(ROUNDS),
                "--min-devices",
                "1",
                "--target-devices",
                "2",
                "--deadline",
                "4",
                "--test-data",
                str(test_npz),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "agg.log", "wb"),
        )
        monitor.wait_for(is_("round", round=1, state="open"), timeout=60, what="round 1 open")
        m1 = monitor.wait_for(is_("metrics", round=1), timeout=60, what="round 1 metrics")
        m2 = monitor.wait_for(is_("metrics", round=2), timeout=60, what="round 2 metrics")
        for m in (m1, m2):
            assert m["test_metric"] == "test_mse" and m["test_mse"] > 0 and m["samples"] > 0
        assert sorted(m1["devices"]) == ["dev-1", "dev-2"]
        uploads = {(e["device_id"], e["round"]) for e in monitor.events if e["event"] == "upload"}
        assert {("dev-1", 1), ("dev-2", 1), ("dev-1", 2), ("dev-2", 2)} <= uploads

        procs["dev-2"].send_signal(signal.SIGKILL)
        procs["dev-2"].wait(10)
        off = monitor.wait_for(is_("device", device_id="dev-2", state="offline"), timeout=20, what="dev-2 offline after SIGKILL")
        assert "last will" in off["detail"]

        # The rest of the run goes on with dev-1 alone (rounds close at the deadline with min 1).
        monitor.wait_for(is_("round", state="finished"), timeout=90, what="the run finishing")
        assert procs["agg"].wait(30) == 0
    finally:
        for proc in procs.values():
            stop_process(proc)
        rc = monitor.stop()
    assert rc == 0
    closed = sorted({e["round"] for e in monitor.events if e["event"] == "round" and e["state"] == "closed"})
    assert closed == list(range(1, ROUNDS + 1))
    # Every round closed at its target or with dev-2 already offline: nobody was late.
    assert not [e for e in monitor.events if e["event"] == "late" and e["late"]], "an offline device is offline, not late"

    report = write_report(state, tmp_path / "report")
    rows = [
        line
        for line in report.read_text().split("## Rounds", 1)[1].split("\n## ")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| round")
    ]
    assert len(rows) == ROUNDS

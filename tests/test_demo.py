"""`fleetlearn demo` end to end, shortened: real broker, aggregator and device processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def run_demo(tmp_path, *extra: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    state = tmp_path / "state"
    r = subprocess.run(
        [sys.executable, "-m", "fleetlearn.cli", "demo", "--rounds", "5", "--quiet", "--state-dir", str(state), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    return r, json.loads((state / "demo_summary.json").read_text())


def test_demo_runs_rounds_and_compares_with_central_training(tmp_path):
    r, summary = run_demo(tmp_path, "--devices", "3")
    rounds = [json.loads(line) for line in (tmp_path / "state" / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds] == [1, 2, 3, 4, 5]
    assert all(x["devices"] == ["dev-0", "dev-1", "dev-2"] for x in rounds)
    assert rounds[-1]["test_mse"] < rounds[0]["test_mse"], "five rounds of training did not help at all"
    assert summary["final_test_mse"] == rounds[-1]["test_mse"] and summary["central_test_mse"] > 0
    assert (tmp_path / "state" / "report" / "report.md").exists()
    for line in r.stdout.splitlines():
        if line.startswith("round"):
            assert "test MSE" in line and "bytes in/out" in line
    assert "federated / central" in r.stdout and "fleetlearn monitor --broker" in r.stdout
    assert "started broker: mosquitto 2." in r.stdout  # Debian's mosquitto is installed here: preferred


def test_demo_with_differential_privacy_prints_its_cost_and_epsilon(tmp_path):
    # A small clip norm keeps the noise (sigma * C) small enough for 5 rounds of 2 devices.
    # ... on the embedded broker, as on a machine without mosquitto (`make demo` must work there).
    r, summary = run_demo(tmp_path, "--dp", "--clip-norm", "0.1", "--no-baseline", env={"FLEETLEARN_MOSQUITTO": "none"})
    assert "started broker: embedded amqtt 0.12.1" in r.stdout
    assert "epsilon" in r.stdout.lower() or "ε" in r.stdout
    assert any(k.startswith("dp") or "epsilon" in k for k in summary), summary

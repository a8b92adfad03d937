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
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, **(env or {})},
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


def _work_dir(stdout: str):
    from pathlib import Path

    line = next(line for line in stdout.splitlines() if line.startswith("fleetlearn demo:"))
    return Path(line.rsplit("work dir ", 1)[1].strip())


def test_demo_partition_gives_each_device_process_the_partitioners_shard(tmp_path):
    import numpy as np

    from fleetlearn.edge_runtime.core.partition import partition

    r, summary = run_demo(tmp_path, "--devices", "3", "--partition", "dirichlet:0.3", "--no-baseline", "--seed", "4")
    assert summary["partition"] == "dirichlet:0.3"
    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        y = d["y_train"]
    work = _work_dir(r.stdout)
    for i, idx in enumerate(partition("dirichlet:0.3", y, 3, seed=4, task="regression")):
        with np.load(work / f"device-{i}-data.npz") as shard:
            assert np.array_equal(shard["y"], y[idx])
    rounds = [json.loads(line) for line in (tmp_path / "state" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["samples"] == len(y)  # every training row trained somewhere, once


def test_demo_non_iid_is_a_deprecated_alias_of_shards_1(tmp_path):
    import numpy as np

    r, summary = run_demo(tmp_path, "--non-iid", "--no-baseline")
    assert "--non-iid is deprecated, use --partition shards:1" in r.stderr
    assert summary["partition"] == "shards:1"
    bands = sorted((np.load(p)["y"].min(), np.load(p)["y"].max()) for p in _work_dir(r.stdout).glob("device-*-data.npz"))
    assert len(bands) == 2 and bands[0][1] <= bands[1][0], "each device holds one price band"


def test_demo_bad_partition_is_a_one_line_error(capsys):
    from fleetlearn.cli import main

    assert main(["demo", "--partition", "dirichlet:-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetlearn demo: error: partition 'dirichlet:-1': alpha must be") and err.count("\n") == 1
    assert main(["demo", "--non-iid", "--partition", "iid"]) == 2
    assert "give one or the other" in capsys.readouterr().err

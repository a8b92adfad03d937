"""`fleetlearn experiment` end to end: real broker, aggregator and device processes per run; the
tables checked against the runs' own rounds.jsonl files (read here with plain json)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

GRID = """
model = "boston-mlp"
devices = {devices}
rounds = {rounds}
batch_size = 16
lr = 0.003
deadline = 30
seeds = [0, 1]
partitions = ["iid", "dirichlet:0.5"]
target = 60.0

[[strategies]]
name = "fedavg"

[[strategies]]
name = "median"
label = "coordinate-median"
"""


def run_experiment(tmp_path: Path, grid: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    config, out = tmp_path / "grid.toml", tmp_path / "out"
    config.write_text(grid)
    r = subprocess.run([sys.executable, "-m", "fleetlearn.cli", "experiment", "--config", str(config), "--out", str(out), *extra],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    return r, out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str) -> float | None:
    return float(text) if text else None


def check_tables_against_round_logs(out: Path, rounds: int, target: float, strategies: dict[str, str], seeds: list[int]) -> None:
    """Every number in results.csv / runs.csv / results.md recomputed from the rounds.jsonl files."""
    from scipy import stats

    runs = _rows(out / "runs.csv")
    assert len(runs) == len(strategies) * 2 * len(seeds)
    by_cell: dict[tuple[str, str], list[dict]] = {}
    central_by_seed: dict[int, set[float]] = {}
    for run in runs:
        state = Path(run["dir"]) / "state"
        log = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines() if line.strip()]
        assert run["status"] == "ok", run
        assert [r["round"] for r in log] == list(range(1, rounds + 1))
        assert all(r["strategy"] == strategies[run["strategy"]] for r in log), "the strategy's args did not reach the aggregator"
        assert float(run["final"]) == log[-1]["test_mse"]
        reached = [r["round"] for r in log if r["test_mse"] <= target]
        assert _num(run["rounds_to_target"]) == (reached[0] if reached else None)
        assert (Path(run["dir"]) / "logs" / "aggregator.log").is_file() and (Path(run["dir"]) / "logs" / "device-1.log").is_file()
        central_by_seed.setdefault(int(run["seed"]), set()).add(float(run["central"]))
        by_cell.setdefault((run["strategy"], run["partition"]), []).append(
            {"final": log[-1]["test_mse"], "rtt": reached[0] if reached else None, "central": float(run["central"])}
        )
    assert all(len(v) == 1 for v in central_by_seed.values()), "a seed's central baseline differs between its runs"
    assert len(set().union(*central_by_seed.values())) == len(seeds), "the seeds' baselines should differ (other initial weights)"

    cells = _rows(out / "results.csv")
    assert [(c["strategy"], c["partition"]) for c in cells] == list(by_cell)
    md = (out / "results.md").read_text()
    for c in cells:
        seen = by_cell[(c["strategy"], c["partition"])]
        finals = [s["final"] for s in seen]
        mean = statistics.mean(finals)
        low, high = stats.t.interval(0.95, len(finals) - 1, loc=mean, scale=statistics.stdev(finals) / math.sqrt(len(finals)))
        assert float(c["final_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(c["final_ci95_low"]) == pytest.approx(low, rel=1e-6) and float(c["final_ci95_high"]) == pytest.approx(
            high, rel=1e-6
        )
        assert c["final_per_seed"] == ";".join(repr(f) for f in finals)
        rtts = [s["rtt"] for s in seen]
        assert c["rounds_to_target_per_seed"] == ";".join("" if r is None else str(r) for r in rtts)
        got = [r for r in rtts if r is not None]
        assert _num(c["rounds_to_target_mean"]) == (statistics.mean(got) if got else None)
        central = statistics.mean(s["central"] for s in seen)
        assert float(c["central_mean"]) == pytest.approx(central, rel=1e-12)
        assert float(c["federated_over_central"]) == pytest.approx(mean / central, rel=1e-12)
        row = next(line for line in md.splitlines() if line.startswith(f"| {c['strategy']} | {c['partition']} |"))
        assert f"{mean:.3f} [{low:.3f}, {high:.3f}]" in row and f"{central:.3f}" in row


def test_experiment_on_the_embedded_broker_tabulates_what_the_round_logs_say(tmp_path):
    r, out = run_experiment(tmp_path, GRID.format(devices=3, rounds=3))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "[8/8]" in r.stdout and "8/8 runs finished" in r.stdout
    check_tables_against_round_logs(out, 3, 60.0, {"fedavg": "fedavg", "coordinate-median": "median"}, [0, 1])
    assert (out / "grid.toml").read_text() == GRID.format(devices=3, rounds=3)
    assert all((Path(row["dir"]) / "logs" / "broker.log").is_file() for row in _rows(out / "runs.csv")), (
        "a broker process per run"
    )
    assert "Traceback" not in r.stderr + r.stdout
    # The runs really were partitioned as the grid says: the shards are the partitioner's output.
    from fleetlearn.edge_runtime.core.partition import partition

    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        y = d["y_train"]
    for i, idx in enumerate(partition("dirichlet:0.5", y, 3, seed=1, task="regression")):
        with np.load(out / "runs" / "fedavg" / "dirichlet-0.5" / "seed-1" / "work" / f"device-{i}-data.npz") as shard:
            assert np.array_equal(shard["y"], y[idx])


@pytest.mark.mosquitto
def test_experiment_against_mosquitto(tmp_path, mosquitto):
    r, out = run_experiment(tmp_path, GRID.format(devices=2, rounds=2), "--broker", mosquitto.url)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert not any((Path(row["dir"]) / "logs" / "broker.log").exists() for row in _rows(out / "runs.csv"))
    check_tables_against_round_logs(out, 2, 60.0, {"fedavg": "fedavg", "coordinate-median": "median"}, [0, 1])


def test_a_failing_run_is_recorded_with_its_reason_and_the_grid_goes_on(tmp_path):
    # DP noise of 1e30 x a clip norm of 1e30 overflows float32: the aggregator refuses to
    # publish the model and exits 3 in round 1. The entry after it must still run.
    grid = """
model = "digits-mlp"
devices = 2
rounds = 2
batch_size = 32
lr = 0.05
seeds = [3]
partitions = ["shards:2"]
target = 0.5

[[strategies]]
name = "fedavg"
label = "overflow"
args = ["--clip-norm", "1e30", "--dp-noise-multiplier", "1e30"]

[[strategies]]
name = "fedavg"
"""
    r, out = run_experiment(tmp_path, grid)
    assert r.returncode == 1, r.stderr[-3000:] + r.stdout[-3000:]
    runs = {row["strategy"]: row for row in _rows(out / "runs.csv")}
    assert runs["overflow"]["status"] == "failed" and "NaN/Inf" in runs["overflow"]["reason"]
    assert "code 3" in runs["overflow"]["reason"] and "\n" not in runs["overflow"]["reason"]
    assert runs["fedavg"]["status"] == "ok"
    log = [json.loads(line) for line in (Path(runs["fedavg"]["dir"]) / "state" / "rounds.jsonl").read_text().splitlines()]
    assert float(runs["fedavg"]["final"]) == log[-1]["test_accuracy"]
    assert 0 <= float(runs["fedavg"]["central"]) <= 1  # classification: the baseline is an accuracy
    cells = {row["strategy"]: row for row in _rows(out / "results.csv")}
    assert cells["overflow"]["ok_seeds"] == "0" and "seed 3: aggregator exited" in cells["overflow"]["failures"]
    md = (out / "results.md").read_text()
    assert "## Failed runs" in md and "overflow / shards:2 / seed 3" in md
    assert (Path(runs["overflow"]["dir"]) / "logs" / "aggregator.log").stat().st_size > 0

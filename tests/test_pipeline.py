"""The whole pipeline on both brokers: a real aggregator and 3 real device processes, 3 rounds."""

from __future__ import annotations

import json

import numpy as np

from fleetlearn.edge_runtime.core.bundle import load_bundle
from tests.conftest import stop_process
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, start_device, write_config


def test_three_devices_three_rounds(any_broker, tmp_path, boston_bundle, boston_shards):
    shards, test_npz = boston_shards
    state = tmp_path / "agg"
    agg = AggregatorProcess(
        tmp_path,
        any_broker.url,
        FLEET,
        state,
        "--rounds",
        "3",
        "--min-devices",
        "3",
        "--deadline",
        "60",
        "--test-data",
        str(test_npz),
        bundle=boston_bundle,
    )
    devices = []
    try:
        for i, shard in enumerate(shards):
            cfg = write_config(tmp_path, any_broker.url, boston_bundle, shard, device_id=f"dev-{i}")
            devices.append(start_device(cfg, tmp_path / f"dev-{i}.log", "--max-rounds", "3"))
        assert agg.wait(120) == 0, agg.text()[-3000:]
        for i, proc in enumerate(devices):
            assert proc.wait(30) == 0, (tmp_path / f"dev-{i}.log").read_text()[-3000:]
    finally:
        for proc in devices:
            stop_process(proc)
        agg.stop()
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["devices"] == ["dev-0", "dev-1", "dev-2"] and r["rejected"] == 0 for r in rounds)
    assert rounds[0]["samples"] == sum(len(np.load(s)["y"]) for s in shards)
    assert rounds[-1]["test_mse"] < rounds[0]["test_mse"]
    n = load_bundle(boston_bundle).num_params
    weights = [np.fromfile(state / "global" / f"round_{r:04d}.f32", dtype="<f4") for r in range(4)]
    assert all(w.size == n for w in weights) and not np.array_equal(weights[0], weights[3])
    assert (state / "model.onnx").is_file()

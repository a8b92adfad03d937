"""Round overhead and wire bytes: 2 real device processes, the real aggregator, a real broker.

    .venv/bin/python bench/bench_round.py [--rounds 50] [--broker mosquitto|amqtt]

Round overhead = the round's wall time (aggregator: open -> closed) minus the slowest device's
local training time that round (from the devices' update_sent log lines). Wire bytes per
round are compared with the raw model size (4 bytes per parameter). Goals from the issue:
overhead < 10 ms on loopback with mosquitto; bytes <= 1.1x the raw model per direction and device.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    args = p.parse_args()
    from bench_device import export_bundle

    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from tests.conftest import Broker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        n = load_bundle(bundle).num_params
        with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
            x, y = d["x_train"], d["y_train"]
            np.savez(work / "test.npz", x=d["x_test"], y=d["y_test"])
        broker = Broker(args.broker, work).start()
        procs, logs = [], []
        try:
            agg = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleetlearn.cli",
                    "aggregator",
                    "--bundle",
                    str(bundle),
                    "--broker",
                    broker.url,
                    "--fleet",
                    "bench",
                    "--rounds",
                    str(args.rounds),
                    "--min-devices",
                    "2",
                    "--deadline",
                    "60",
                    "--state-dir",
                    str(work / "agg"),
                    "--test-data",
                    str(work / "test.npz"),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                stderr=open(work / "agg.log", "wb"),
            )
            for i, idx in enumerate(np.array_split(np.arange(len(x)), 2)):
                np.savez(work / f"shard{i}.npz", x=x[idx], y=y[idx])
                cfg = work / f"dev{i}.toml"
                cfg.write_text(
                    f'device_id = "dev-{i}"\nfleet = "bench"\nbroker = "{broker.url}"\nbundle = "{bundle}"\n'
                    f'data = "{work / f"shard{i}.npz"}"\nstate_dir = "{work / f"state{i}"}"\n[training]\nbatch_size = 8\n'
                )
                log = work / f"dev{i}.log"
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "fleetlearn.cli",
                            "device",
                            "--config",
                            str(cfg),
                            "--max-rounds",
                            str(args.rounds),
                        ],
                        cwd=ROOT,
                        stderr=open(log, "wb"),
                    )
                )
            assert agg.wait(600) == 0, (work / "agg.log").read_text()[-2000:]
            for proc in procs:
                proc.wait(60)
        finally:
            for proc in procs:
                proc.kill() if proc.poll() is None else None
            broker.stop()
        rounds = [json.loads(line) for line in (work / "agg" / "rounds.jsonl").read_text().splitlines()]
        train: dict[int, float] = {}
        for log in logs:
            for m in re.finditer(r"event=update_sent device=\S+ round=(\d+) .*?train_s=([0-9.]+)", log.read_text()):
                train[int(m.group(1))] = max(train.get(int(m.group(1)), 0.0), float(m.group(2)))
    steady = rounds[1:]  # round 1 includes devices' start-up and the bundle load
    overhead_ms = [1000 * (r["wall_s"] - train[r["round"]]) for r in steady if r["round"] in train]
    wall_ms = [1000 * r["wall_s"] for r in steady]
    raw = 4 * n
    up = statistics.median(r["bytes_in"] / len(r["devices"]) for r in steady)
    down = statistics.median(r["bytes_out"] for r in steady)
    result = {
        "broker": args.broker,
        "rounds": len(rounds),
        "round_wall_ms_median": round(statistics.median(wall_ms), 2),
        "round_overhead_ms_median": round(statistics.median(overhead_ms), 2),
        "round_overhead_ms_p90": round(sorted(overhead_ms)[int(0.9 * (len(overhead_ms) - 1))], 2),
        "slowest_device_train_ms_median": round(1000 * statistics.median(train[r["round"]] for r in steady), 2),
        "raw_model_bytes": raw,
        "update_bytes_per_device": up,
        "global_bytes_per_device": down,
        "up_ratio": round(up / raw, 3),
        "down_ratio": round(down / raw, 3),
        "final_test_mse": round(rounds[-1]["test_mse"], 3),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Aggregator ingest: how many Boston updates per second one aggregator validates and folds in,
and whether its memory grows with the device count (it should not: FedAvg is streaming).

    .venv/bin/python bench/bench_ingest.py [--devices 200 500]

A scripted publisher (one MQTT client) sends one real UPDATE frame per simulated device to a
real aggregator subprocess on mosquitto; we time from the first publish to the round's record
in rounds.jsonl, and sample the aggregator's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_once(k: int, work: Path, bundle: Path, broker_url: str) -> dict:
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.protocol import GlobalModel, Topics, Update
    from tests.peers import Peer

    m = load_bundle(bundle)
    fleet = f"ingest{k}"
    t = Topics(fleet)
    state = work / f"agg-{k}"
    agg = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn.cli",
            "aggregator",
            "--bundle",
            str(bundle),
            "--broker",
            broker_url,
            "--fleet",
            fleet,
            "--rounds",
            "1",
            "--min-devices",
            str(k),
            "--deadline",
            "600",
            "--state-dir",
            str(state),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stderr=open(work / f"agg-{k}.log", "wb"),
    )
    peer = Peer(broker_url, [t.global_model])
    _, payload = peer.wait_for(lambda topic, p: topic == t.global_model and len(p) > 0, timeout=60)
    g = GlobalModel.decode(payload, m.num_params)
    rng = np.random.default_rng(0)
    frames = [
        (
            t.update(f"dev-{i}"),
            Update(
                g.run_id,
                g.round,
                f"dev-{i}",
                m.model_hash,
                100,
                1.0,
                0.01,
                secrets.token_hex(16),
                rng.normal(0, 1e-3, m.num_params).astype(np.float32),
            ).encode(),
        )
        for i in range(k)
    ]
    peak = 0.0
    start = time.perf_counter()
    for topic, frame in frames:
        peer.client.publish(topic, frame, qos=1)
    log = state / "rounds.jsonl"
    while not log.exists():
        peak = max(peak, hwm_mb(agg.pid))
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    peak = max(peak, hwm_mb(agg.pid))
    agg.wait(60)
    peer.close()
    record = json.loads(log.read_text().splitlines()[0])
    assert len(record["devices"]) == k, record
    return {
        "devices": k,
        "seconds": round(elapsed, 3),
        "updates_per_s": round(k / elapsed, 1),
        "aggregator_peak_rss_mb": round(peak, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=int, nargs="+", default=[100, 400])
    args = p.parse_args()
    from bench_device import export_bundle

    from tests.conftest import Broker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        broker = Broker("mosquitto", work).start()
        try:
            results = [run_once(k, work, bundle, broker.url) for k in args.devices]
        finally:
            broker.stop()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

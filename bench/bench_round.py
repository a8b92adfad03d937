"""Round cycle overhead and wire bytes: 2 real device processes, the real aggregator, a real broker.

    .venv/bin/python bench/bench_round.py [--rounds 50] [--broker mosquitto|amqtt]

Round cycle overhead, counted honestly (issue 13): per round r, from round r's opening to
round r+1's opening, minus the slowest device's local training in round r. Both openings are
`opened_at` in the aggregator's round log (rounds.jsonl), taken at the same point of the round
engine's loop each round, so their difference is the whole cycle: the global model's way to the
devices, their training and upload, validation, acks, the aggregation, evaluation, the durable
commit (wherever it sits) and the next round's preparation. The training time is the devices'
own `train_s` (their update_sent log lines). Round 1 (devices start up, load the bundle) and
the last round (no next opening) are left out.

Baseline, measured in the same run against the same broker: the raw MQTT round trip of two
hops, paho publish -> broker -> paho subscriber -> publish back -> broker -> the first client,
7 KB payloads at QoS 1 (the floor of a round: the global model goes out, an update comes back).

Wire bytes per round are compared with the raw model size (4 bytes per parameter), each figure
labelled for what it counts. Every figure is printed as a bench/rows.py row.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rows import Row, emit  # noqa: E402

BENCH = "bench_round"
GOAL_MS = 2.0


def raw_round_trip_ms(host: str, port: int, payload_bytes: int = 7 * 1024, n: int = 300, warmup: int = 30) -> list[float]:
    """Two hops with bare paho clients (TCP_NODELAY, QoS 1), one message in flight at a time:
    A publishes on `fwd`; B, subscribed to it, publishes the payload back on `back` from its
    message callback; A times until it receives it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = threading.Event()
    subscribed = threading.Semaphore(0)
    prefix = f"rawrt/{time.monotonic_ns()}"

    def client(cid: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
        c.on_subscribe = lambda *a: subscribed.release()
        c.connect(host, port, keepalive=60)
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    a, b = client(prefix + "-a"), client(prefix + "-b")
    b.on_message = lambda c, u, m: c.publish(f"{prefix}/back", m.payload, qos=1)
    a.on_message = lambda c, u, m: got.set()
    for c in (a, b):
        c.loop_start()
    a.subscribe(f"{prefix}/back", qos=1)
    b.subscribe(f"{prefix}/fwd", qos=1)
    for _ in range(2):
        if not subscribed.acquire(timeout=10):
            raise RuntimeError("raw paho clients could not subscribe")
    payload = bytes(payload_bytes)
    out = []
    try:
        for i in range(warmup + n):
            got.clear()
            t0 = time.perf_counter()
            a.publish(f"{prefix}/fwd", payload, qos=1)
            if not got.wait(10):
                raise RuntimeError("raw round trip lost a message")
            if i >= warmup:
                out.append(1000 * (time.perf_counter() - t0))
    finally:
        for c in (a, b):
            c.loop_stop()
            c.disconnect()
    return out


def p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def run_fleet(args: argparse.Namespace, work: Path, bundle: Path, broker_url: str) -> tuple[list[dict], dict[int, float]]:
    """The aggregator and 2 devices, to the end; (round records, slowest train_s per round)."""
    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        x, y = d["x_train"], d["y_train"]
        np.savez(work / "test.npz", x=d["x_test"], y=d["y_test"])
    procs, logs = [], []
    # fmt: off
    agg = subprocess.Popen(
        [sys.executable, "-m", "fleetlearn.cli", "aggregator", "--bundle", str(bundle), "--broker", broker_url,
         "--fleet", "bench", "--rounds", str(args.rounds), "--min-devices", "2", "--deadline", "60",
         "--state-dir", str(work / "agg"), "--test-data", str(work / "test.npz"), "--log-level", "warning"],
        cwd=ROOT, stderr=open(work / "agg.log", "wb"),
    )
    # fmt: on
    try:
        for i, idx in enumerate(np.array_split(np.arange(len(x)), 2)):
            np.savez(work / f"shard{i}.npz", x=x[idx], y=y[idx])
            cfg = work / f"dev{i}.toml"
            cfg.write_text(
                f'device_id = "dev-{i}"\nfleet = "bench"\nbroker = "{broker_url}"\nbundle = "{bundle}"\n'
                f'data = "{work / f"shard{i}.npz"}"\nstate_dir = "{work / f"state{i}"}"\n[training]\nbatch_size = 8\n'
            )
            log = work / f"dev{i}.log"
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg), "--max-rounds", str(args.rounds)],
                    cwd=ROOT,
                    stderr=open(log, "wb"),
                )
            )
        assert agg.wait(600) == 0, (work / "agg.log").read_text()[-2000:]
        for proc in procs:
            proc.wait(60)
    finally:
        for proc in [agg, *procs]:
            proc.kill() if proc.poll() is None else None
    rounds = [json.loads(line) for line in (work / "agg" / "rounds.jsonl").read_text().splitlines()]
    train: dict[int, float] = {}
    for log in logs:
        for m in re.finditer(r"event=update_sent device=\S+ round=(\d+) .*?train_s=([0-9.]+)", log.read_text()):
            train[int(m.group(1))] = max(train.get(int(m.group(1)), 0.0), float(m.group(2)))
    return rounds, train


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
        broker = Broker(args.broker, work).start()
        try:
            rounds, train = run_fleet(args, work, bundle, broker.url)
            raw_rt = raw_round_trip_ms("127.0.0.1", broker.port)
        finally:
            broker.stop()
    by_round = {r["round"]: r for r in rounds}
    # Round r's cycle: opening r -> opening r+1. Round 1 holds the devices' start-up.
    steady = [r for r in sorted(by_round) if r >= 2 and r + 1 in by_round and r in train]
    cycle_ms = [1000 * (by_round[r + 1]["opened_at"] - by_round[r]["opened_at"]) for r in steady]
    train_ms = [1000 * train[r] for r in steady]
    overhead_ms = [c - t for c, t in zip(cycle_ms, train_ms)]
    raw = 4 * n
    records = [by_round[r] for r in steady]
    up = statistics.median(r["bytes_in"] / len(r["devices"]) for r in records)
    down = statistics.median(r["global_bytes"] for r in records) if all("global_bytes" in r for r in records) else None
    rt = statistics.median(raw_rt)
    result = {
        "broker": args.broker,
        "rounds": len(rounds),
        "cycles_counted": len(steady),
        "round_cycle_ms_median": round(statistics.median(cycle_ms), 3),
        "slowest_device_train_ms_median": round(statistics.median(train_ms), 3),
        "cycle_overhead_ms_median": round(statistics.median(overhead_ms), 3),
        "cycle_overhead_ms_p90": round(p90(overhead_ms), 3),
        "raw_2hop_round_trip_ms_median": round(rt, 3),
        "raw_2hop_round_trip_ms_p90": round(p90(raw_rt), 3),
        "raw_model_bytes": raw,
        "update_frame_bytes_per_device": up,
        "global_frame_bytes_per_device": down,
        "final_test_mse": round(rounds[-1]["test_mse"], 3),
    }
    print(json.dumps(result, indent=1))
    base = f"raw paho 2-hop round trip via {args.broker}, 7 KB QoS 1, median"
    what = f"round cycle overhead ({args.broker}, 2 devices, Boston MLP): open(r)->open(r+1) minus slowest device's training"
    med = statistics.median(overhead_ms)
    emit(Row(BENCH, what + ", median", med, "ms", base, rt, f"< {GOAL_MS:g} ms", med < GOAL_MS))
    emit(Row(BENCH, what + ", p90", p90(overhead_ms), "ms", base, rt, f"< {GOAL_MS:g} ms (median)", None))
    emit(Row(BENCH, f"round cycle, whole ({args.broker}), median", statistics.median(cycle_ms), "ms", base, rt))
    emit(
        Row(
            BENCH,
            "UPDATE frame bytes per device per round (header + meta + float32 body, as received)",
            up,
            "bytes",
            "raw model bytes (4 x params)",
            raw,
            "<= 1.1x",
            up <= 1.1 * raw,
        )
    )
    if down is not None:
        emit(
            Row(
                BENCH,
                "global-model frame bytes per device per round (one retained publish)",
                down,
                "bytes",
                "raw model bytes (4 x params)",
                raw,
                "<= 1.1x",
                down <= 1.1 * raw,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Aggregator ingest: how many Boston updates per second one aggregator validates and folds in,
against what the broker and paho alone move, and whether its memory grows with the device count
(it should not: FedAvg is streaming).

    .venv/bin/python bench/bench_ingest.py [--devices 1000 4000] [--py-spy PATH]

For each device count N, moments apart on one mosquitto:

  baseline  one raw paho publisher sends the N real UPDATE frames (QoS 1) to one raw paho
            subscriber in its own process (subscription QoS 1, as the aggregator's): time from
            the first publish to the subscriber holding all N (it prints a line; we read the pipe).
  value     the same publisher (same client settings) sends the same N frames to a real
            aggregator subprocess (subscription QoS 1) in a round that closes at N accepted
            updates: time from the first publish to the round's record in rounds.jsonl, so it
            counts validation, folding, group commits, acks and the round's close (evaluation +
            durable commit, a fixed cost that larger N amortises).

Rows (bench/rows.py): updates/s vs raw msgs/s (goal >= 0.5x) per N, and the aggregator's peak RSS
(VmHWM) at the largest N vs the smallest (memory must not grow with the device count).
`--py-spy PATH` records the aggregator of the largest N with py-spy (PATH: the py-spy binary)
into --profile-out (speedscope JSON, every thread).
"""

from __future__ import annotations

import argparse
import json
import os
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

from rows import Row, emit  # noqa: E402

PUBLISHER_INFLIGHT = 100  # the aggregator's own link keeps 100 QoS 1 messages in flight too


def hwm_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds so far of process `pid` (every thread), or of its thread `tid`."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = open(path).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def paho_client(url: str, name: str):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = url.split("://", 1)[1].split(":")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(4)}")
    client.max_inflight_messages_set(PUBLISHER_INFLIGHT)
    client.connect(host, int(port))
    return client


def publish_all(client, frames: list[tuple[str, bytes]]) -> float:
    """Queue every frame at QoS 1 (paho's network thread sends them); returns the start time."""
    start = time.perf_counter()
    for topic, frame in frames:
        client.publish(topic, frame, qos=1)
    return start


def raw_subscriber(url: str, topic: str, count: int) -> int:
    """The baseline's receiving end (a process of its own, like the aggregator): subscribe at QoS 1,
    print `ready`, then `done` once `count` messages arrived."""
    import threading

    client = paho_client(url, "raw-sub")
    got = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(c, u, m) -> None:
        got[0] += 1
        if got[0] >= count:
            done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.loop_start()
    client.subscribe(topic, qos=1)
    subscribed.wait(10)
    print("ready", flush=True)
    cpu0 = time.process_time()
    done.wait(600)
    print("done", got[0], time.process_time() - cpu0, flush=True)
    client.loop_stop()
    client.disconnect()
    return 0


def run_raw(k: int, url: str, frames: list[bytes]) -> tuple[float, float]:
    """Raw paho -> mosquitto -> paho: messages/s for the same k frames, and the subscriber's CPU
    microseconds per message."""
    prefix = f"raw{k}-{secrets.token_hex(3)}"
    sub = subprocess.Popen(
        [sys.executable, __file__, "--raw-subscriber", url, f"{prefix}/update/+", str(k)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        raise RuntimeError("raw subscriber did not start")
    pub = paho_client(url, "raw-pub")
    pub.loop_start()
    time.sleep(0.2)
    start = publish_all(pub, [(f"{prefix}/update/dev-{i}", f) for i, f in enumerate(frames)])
    line = sub.stdout.readline()
    elapsed = time.perf_counter() - start
    sub.wait(30)
    pub.loop_stop()
    pub.disconnect()
    if not line.startswith("done"):
        raise RuntimeError(f"raw subscriber: {line!r}")
    return k / elapsed, 1e6 * float(line.split()[2]) / k


def run_aggregator(
    k: int,
    work: Path,
    bundle: Path,
    url: str,
    py_spy: str | None,
    profile_out: Path,
    log_level: str = "warning",
    keep_log: Path | None = None,
) -> dict:
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.protocol import GlobalModel, Topics, Update
    from tests.peers import Peer

    m = load_bundle(bundle)
    fleet = f"ingest{k}-{secrets.token_hex(3)}"
    t = Topics(fleet)
    state = work / fleet
    cmd = [sys.executable, "-m", "fleetlearn.cli", "aggregator", "--bundle", str(bundle), "--broker", url]
    cmd += ["--fleet", fleet, "--rounds", "1", "--min-devices", str(k), "--deadline", "600"]
    cmd += ["--state-dir", str(state), "--log-level", log_level]
    if py_spy:
        cmd = [py_spy, "record", "--threads", "--rate", "250", "--format", "speedscope", "-o", str(profile_out), "--", *cmd]
    agg = subprocess.Popen(cmd, cwd=ROOT, stderr=open(work / f"{fleet}.log", "wb"))
    peer = Peer(url, [t.global_model])
    _, payload = peer.wait_for(lambda topic, p: topic == t.global_model and len(p) > 0, timeout=60)
    peer.close()
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
    # The raw baseline right before, with the same frames and the same publisher settings.
    raw, raw_cpu_us = run_raw(k, url, [f for _, f in frames])
    agg_pid = agg.pid
    if py_spy:  # py-spy's child is the aggregator
        time.sleep(0.5)
        kids = Path(f"/proc/{agg.pid}/task/{agg.pid}/children").read_text().split()
        agg_pid = int(kids[0]) if kids else agg.pid
    pub = paho_client(url, "ingest-pub")
    pub.loop_start()
    time.sleep(0.2)
    peak = 0.0
    log = state / "rounds.jsonl"
    cpu0, main0 = cpu_s(agg_pid), cpu_s(agg_pid, agg_pid)
    start = publish_all(pub, frames)
    while not log.exists():
        peak = max(peak, hwm_mb(agg_pid))
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    cpu, main = cpu_s(agg_pid) - cpu0, cpu_s(agg_pid, agg_pid) - main0
    peak = max(peak, hwm_mb(agg_pid))
    agg.wait(120)
    pub.loop_stop()
    pub.disconnect()
    if keep_log is not None:
        keep_log.write_bytes((work / f"{fleet}.log").read_bytes())
    record = json.loads(log.read_text().splitlines()[0])
    assert len(record["devices"]) == k, record
    return {
        "devices": k,
        "seconds": round(elapsed, 3),
        "updates_per_s": round(k / elapsed, 1),
        "raw_msgs_per_s": round(raw, 1),
        "aggregator_cpu_us_per_update": round(1e6 * cpu / k, 1),
        "engine_thread_cpu_us_per_update": round(1e6 * main / k, 1),  # the rest: paho's network thread, the writer
        "raw_subscriber_cpu_us_per_msg": round(raw_cpu_us, 1),
        "frame_bytes": len(frames[0][1]),
        "aggregator_peak_rss_mb": round(peak, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--py-spy", default=None, help="path to py-spy: profile the aggregator of the largest N")
    p.add_argument("--profile-out", type=Path, default=ROOT / "bench" / "ingest-profile.json")
    p.add_argument("--log-level", default="warning", help="the aggregator's --log-level")
    p.add_argument("--keep-logs", type=Path, default=None, help="copy each aggregator's log to DIR/ingest-N.log")
    p.add_argument("--raw-subscriber", nargs=3, metavar=("URL", "TOPIC", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_subscriber:
        url, topic, count = args.raw_subscriber
        return raw_subscriber(url, topic, int(count))
    from bench_device import export_bundle

    from tests.conftest import Broker

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        broker = Broker("mosquitto", work).start()
        try:
            results = []
            for k in args.devices:
                spy = args.py_spy if k == max(args.devices) else None
                keep = args.keep_logs / f"ingest-{k}.log" if args.keep_logs else None
                r = run_aggregator(k, work, bundle, broker.url, spy, args.profile_out, args.log_level, keep)
                results.append(r)
                emit(
                    Row(
                        bench="bench_ingest",
                        what=f"Boston updates validated + folded in + acked durably, {k} devices, {r['frame_bytes']} B frames, to the round's record",
                        value=r["updates_per_s"],
                        unit="updates/s",
                        baseline_what=f"raw paho -> mosquitto -> paho msgs/s, same {k} frames, QoS 1",
                        baseline=r["raw_msgs_per_s"],
                        goal=">= 0.5x",
                        met=r["updates_per_s"] >= 0.5 * r["raw_msgs_per_s"],
                        extra={
                            "seconds": r["seconds"],
                            "aggregator_cpu_us_per_update": r["aggregator_cpu_us_per_update"],
                            "engine_thread_cpu_us_per_update": r["engine_thread_cpu_us_per_update"],
                            "raw_subscriber_cpu_us_per_msg": r["raw_subscriber_cpu_us_per_msg"],
                        },
                    )
                )
        finally:
            broker.stop()
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        emit(
            Row(
                bench="bench_ingest",
                what=f"aggregator peak RSS (VmHWM) with {hi['devices']} devices in a round",
                value=hi["aggregator_peak_rss_mb"],
                unit="MB",
                baseline_what=f"the same with {lo['devices']} devices",
                baseline=lo["aggregator_peak_rss_mb"],
                goal="<= 1.1x (memory does not grow with the device count)",
                met=hi["aggregator_peak_rss_mb"] <= 1.1 * lo["aggregator_peak_rss_mb"],
                # What each extra device costs, against what holding its update would cost.
                extra={
                    "kb_per_extra_device": round(
                        1024 * (hi["aggregator_peak_rss_mb"] - lo["aggregator_peak_rss_mb"]) / (hi["devices"] - lo["devices"]), 2
                    ),
                    "update_frame_kb": round(hi["frame_bytes"] / 1024, 2),
                },
            )
        )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

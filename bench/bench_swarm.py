"""`fleetlearn swarm` at fleet scale: 1,000 real device agents in one process against one mosquitto.

    .venv/bin/python bench/bench_swarm.py [--devices 1000] [--small 100] [--rounds 3]

Three measurements, all in this run, with the load average beside each:
1. rounds: `fleetlearn swarm --devices N` and a real aggregator (target N, minimum 0.99 N):
   round wall time (rounds 2.. : round 1 includes the swarm's start), aggregator CPU seconds per
   round (utime+stime over the run / rounds), peak RSS of swarm and aggregator;
2. memory per extra device: (peak RSS with N devices - with `--small` devices) / (N - small);
3. fan-out: a global-model frame published (retained, QoS 1) to N swarm devices, from the
   publish to the last device's receipt, against N raw paho clients on the same EpollLoop design
   receiving the same frame from the same broker (once with clean sessions, once with
   persistent sessions as the devices have), alternately, `--reps` (9) times each, the order
   rotated every repetition (nobody always goes first or last): median ratios, plus the median
   of the per-repetition ratios and the CPU seconds this process spent per fan-out.

Every figure is also printed as a `ROW {json}` line (bench/rows.py) for bench/run_all.py.

State dirs live on /dev/shm when it exists: on this machine's shared disk a rename or unlink
costs 2-3 ms under the other jobs' fsyncs, which would make this a file-system benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rows import Row, emit, load_average  # noqa: E402


def proc_status(pid: int, key: str) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def big_broker(work: Path):
    from tests.test_swarm import BigMosquitto

    return BigMosquitto(work).start()


def device_toml(work: Path, url: str, fleet: str, bundle: Path, state: Path, engine: str = "auto") -> Path:
    cfg = work / f"{fleet}.toml"
    cfg.write_text(
        f'device_id = "unused"\nfleet = "{fleet}"\nbroker = "{url}"\nbundle = "{bundle}"\ndata = "unused.npz"\n'
        f'state_dir = "{state}"\n\n[training]\nbatch_size = 8\nmax_steps = 2\nthreads = 1\nengine = "{engine}"\n'
    )
    return cfg


def rounds_run(
    n: int, rounds: int, work: Path, bundle: Path, data: Path, url: str, state_root: Path, engine: str = "auto"
) -> dict:
    fleet = f"swb{n}"
    agg_state = work / f"agg-{n}"
    agg = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn.cli",
            "aggregator",
            "--bundle",
            str(bundle),
            "--broker",
            url,
            "--fleet",
            fleet,
            "--rounds",
            str(rounds),
            "--min-devices",
            str(int(n * 0.99)),
            "--target-devices",
            str(n),
            "--deadline",
            "300",
            "--state-dir",
            str(agg_state),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stderr=open(work / f"agg-{n}.log", "wb"),
    )
    swarm = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn.cli",
            "swarm",
            "--config",
            str(device_toml(work, url, fleet, bundle, state_root / fleet, engine)),
            "--devices",
            str(n),
            "--data",
            str(data),
            "--max-rounds",
            str(rounds),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stderr=open(work / f"swarm-{n}.log", "wb"),
    )
    swarm_hwm = agg_hwm = agg_cpu = 0.0
    loads = []
    while agg.poll() is None or swarm.poll() is None:
        swarm_hwm = max(swarm_hwm, proc_status(swarm.pid, "VmHWM"))
        agg_hwm = max(agg_hwm, proc_status(agg.pid, "VmHWM"))
        agg_cpu = max(agg_cpu, cpu_s(agg.pid))
        loads.append(os.getloadavg()[0])
        time.sleep(0.1)
    if agg.returncode or swarm.returncode:
        raise SystemExit(f"n={n}: aggregator exit {agg.returncode}, swarm exit {swarm.returncode}; logs in {work}")
    recs = [json.loads(line) for line in (agg_state / "rounds.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in recs[1:]] or [recs[0]["wall_s"]]
    return {
        "devices": n,
        "rounds": len(recs),
        "accepted_min": min(r["accepted"] for r in recs),
        "round1_wall_s": recs[0]["wall_s"],
        "round_wall_s_median_after_1": float(np.median(walls)),
        "aggregator_cpu_s_per_round": round(agg_cpu / len(recs), 3),
        "swarm_peak_rss_mb": round(swarm_hwm, 1),
        "aggregator_peak_rss_mb": round(agg_hwm, 1),
        "load_1min_min_max": [round(min(loads), 1), round(max(loads), 1)],
        "load_at_end": load_average(),
    }


def fanout(n: int, work: Path, bundle: Path, data: Path, url: str, state_root: Path, reps: int = 9, engine: str = "auto") -> dict:
    """Publish a global-model frame (retained, QoS 1) to n raw paho clients on one EpollLoop
    and the same-size frame to n swarm devices (their own EpollLoop), alternately `reps` times
    each; time publish -> last receipt (for a device: its agent is handed the message)."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.mqtt import LinkOptions
    from fleetlearn.edge_runtime.core.mqtt_epoll import EpollLink, EpollLoop, raise_nofile_limit
    from fleetlearn.edge_runtime.core.protocol import GlobalModel, Topics
    from fleetlearn.edge_runtime.device.config import load_device_config
    from fleetlearn.edge_runtime.device.swarm import Swarm, device_ids, write_shards
    from tests.peers import Peer

    raise_nofile_limit()
    m = load_bundle(bundle)
    weights = np.zeros(m.num_params, np.float32)
    pub = Peer(url)

    def serve(loop: EpollLoop, cond, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise SystemExit("fan-out: timed out")
            loop.run_once(0.01)

    # n raw paho clients on one EpollLoop, twice: clean sessions (the plainest subscriber) and
    # persistent sessions (what the devices use: the broker then keeps per-client session state)
    groups = []
    for clean in (True, False):
        loop = EpollLoop()
        got: dict[int, float] = {}
        topic = f"fanout/raw-{'clean' if clean else 'persistent'}/global"
        links = []
        for i in range(n):
            link = EpollLink(
                LinkOptions(url=url, client_id=f"raw-{clean}-{i}", clean_session=clean),
                on_message=lambda t, p, i=i, got=got: got.setdefault(i, time.perf_counter()),
                loop=loop,
            )
            link.subscribe(topic, qos=1)
            links.append(link.start())
        serve(loop, lambda links=links: all(lk.connected.is_set() for lk in links), 120)
        groups.append(("clean" if clean else "persistent", loop, links, got, topic))

    # n swarm devices (real agents; here only their receipt is timed: events are not handled, so nobody trains)
    fleet = "fanout"
    cfg = load_device_config(device_toml(work, url, fleet, bundle, state_root / fleet, engine))
    ids = device_ids("fan-", n)
    swarm = Swarm(cfg, ids, write_shards(str(data), Path(cfg.state_dir), ids, "iid", 0, m.task), max_rounds=None)
    seen: dict[int, float] = {}
    gtopic = Topics(fleet).global_model

    class Recording(collections.deque):
        def append(self, item):
            if item[1].topic == gtopic:
                seen.setdefault(id(item[0]), time.perf_counter())
            super().append(item)

    swarm.events = Recording()
    swarm.start()
    serve(swarm.loop, lambda: all(a.link.connected.is_set() for a in swarm.agents), 120)
    for loop in [g[1] for g in groups] + [swarm.loop]:  # SUBACKs, connect-time statuses
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            loop.run_once(0.01)
    swarm.events.clear()

    # One measurement: publish, then serve only that group's loop until all n have the frame.
    # Wall time is publish -> last receipt; CPU is this process's (the loop's) over the same span.
    targets = {name: (loop, got, topic) for name, loop, _links, got, topic in groups}
    targets["swarm"] = (swarm.loop, seen, gtopic)
    order = ["clean", "persistent", "swarm"]
    times: dict[str, list[float]] = {k: [] for k in order}
    cpu: dict[str, list[float]] = {k: [] for k in order}
    validated: list[float] = []
    for rep in range(reps):
        frame = GlobalModel("cd" * 16, rep + 1, m.model_hash, weights).encode()
        # Rotate who goes first: the broker and the machine then treat every group alike.
        for name in order[rep % 3 :] + order[: rep % 3]:
            loop, got, topic = targets[name]
            got.clear()
            c0, t0 = time.process_time(), time.perf_counter()
            pub.client.publish(topic, frame, qos=1, retain=True)
            serve(loop, lambda got=got: len(got) == n, 60)
            times[name].append(max(got.values()) - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "swarm":  # and until every device holds the validated model (what _on_global decodes)
                for _agent, event in swarm.events:
                    if event.topic == gtopic:
                        swarm.global_decoder(event.payload)
                validated.append(time.perf_counter() - t0)
            swarm.events.clear()
    for _name, loop, links, _got, _topic in groups:
        for lk in links:
            lk.stop()
        serve(loop, lambda links=links: not any(lk._sock_open for lk in links), 5)
        loop.close()
    swarm.stopping.set()
    for a in swarm.agents:
        swarm._close(a)
    swarm._drain(5)
    pub.close()
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "devices": n,
        "engine": engine_note(bundle, engine),
        "frame_bytes": len(frame),
        "reps": reps,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "cpu_s_median": {k: round(float(np.median(v)), 4) for k, v in cpu.items()},
        "swarm_validated_median_s": round(float(np.median(validated)), 4),
        "global_decodes": [swarm.global_decoder.decoded, swarm.global_decoder.decoded + swarm.global_decoder.shared],
        "ratio_swarm_over_raw_clean": round(med["swarm"] / med["clean"], 3),
        "ratio_swarm_over_raw_persistent": round(med["swarm"] / med["persistent"], 3),
        "paired_median_ratio": {
            k: round(float(np.median([a / b for a, b in zip(times["swarm"], times[k])])), 3) for k in ("clean", "persistent")
        },
        "load": load_average(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=9, help="fan-out repetitions of each group (medians)")
    p.add_argument("--fanout-only", action="store_true")
    p.add_argument("--engine", default="auto", choices=["auto", "ort-training", "portable"], help="the devices' engine")
    args = p.parse_args()
    from bench_device import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shm = Path("/dev/shm")
        state_root = Path(tempfile.mkdtemp(prefix="fleetlearn-swarm-", dir=shm if shm.is_dir() else work))
        bundle = export_bundle(work / "bundle")
        with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
            data = work / "train.npz"
            np.savez(data, x=d["x_train"], y=d["y_train"])
        broker = big_broker(work)
        try:
            out = {"fanout": fanout(args.devices, work, bundle, data, broker.url, state_root, args.reps, args.engine)}
            if args.fanout_only:
                print(json.dumps(out, indent=1))
                emit_rows(out)
                return 0
            small = rounds_run(args.small, args.rounds, work, bundle, data, broker.url, state_root, args.engine)
            big = rounds_run(args.devices, args.rounds, work, bundle, data, broker.url, state_root, args.engine)
            out["rounds"] = [small, big]
            out["memory_per_extra_device_mb"] = round(
                (big["swarm_peak_rss_mb"] - small["swarm_peak_rss_mb"]) / (args.devices - args.small), 3
            )
            out["engine_sets"] = engine_note(bundle, args.engine)
        finally:
            broker.stop()
            import shutil

            shutil.rmtree(state_root, ignore_errors=True)
    print(json.dumps(out, indent=1))
    emit_rows(out)
    return 0


def engine_note(bundle: Path, asked: str) -> str:
    """The engine the swarm's devices opened, and what it means for memory."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.engines.select import choose_engine

    engine = choose_engine(load_bundle(bundle), asked)
    return f"{engine} engine" + (", its own ORT session set per device" if engine == "ort-training" else ", shared sessions")


def emit_rows(out: dict) -> None:
    f = out["fanout"]
    n = f["devices"]
    what = (
        f"fan-out: a {f['frame_bytes']:,}-byte GLOBAL frame published retained at QoS 1 until the last of {n:,} swarm "
        f"devices ({f['engine']}) has it (its agent is handed the message), median of {f['reps']} rotated reps"
    )
    for kind, key in (("clean", "ratio_swarm_over_raw_clean"), ("persistent", "ratio_swarm_over_raw_persistent")):
        emit(
            Row(
                bench="bench_swarm",
                what=what,
                value=f["median_s"]["swarm"],
                unit="s",
                baseline_what=f"{n:,} raw paho clients ({kind} sessions, QoS 1) on the same EpollLoop design, same frame "
                "and broker, until the last on_message",
                baseline=f["median_s"][kind],
                goal="<= 1.2x",
                met=f[key] <= 1.2,
                load=f["load"],
                extra={"paired_median_ratio": f["paired_median_ratio"][kind], "cpu_s_median": f["cpu_s_median"]},
            )
        )
    emit(
        Row(
            bench="bench_swarm",
            what=f"fan-out until the last of {n:,} swarm devices holds the decoded, validated GLOBAL model (the "
            f"receipts above, then the swarm's shared decode: {f['global_decodes'][0]} decodes for "
            f"{f['global_decodes'][1]:,} receipts), median of {f['reps']}",
            value=f["swarm_validated_median_s"],
            unit="s",
            baseline_what=f"{n:,} raw paho clients (persistent sessions) until the last on_message (no decode)",
            baseline=f["median_s"]["persistent"],
            load=f["load"],
        )
    )
    if "rounds" not in out:
        return
    small, big = out["rounds"]
    emit(
        Row(
            bench="bench_swarm",
            what=f"devices accepted in the worst of {big['rounds']} rounds, {big['devices']:,}-device swarm, mosquitto",
            value=big["accepted_min"],
            unit="devices",
            baseline_what="target devices (minimum 0.99x)",
            baseline=big["devices"],
            goal=">= 0.99x",
            met=big["accepted_min"] >= 0.99 * big["devices"],
            load=big["load_at_end"],
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"round wall time, {big['devices']:,}-device swarm (median of rounds 2..; round 1 includes the "
            "swarm's start), Boston MLP, max_steps 2",
            value=big["round_wall_s_median_after_1"],
            unit="s",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["round_wall_s_median_after_1"],
            load=big["load_at_end"],
            extra={"load_1min_min_max": big["load_1min_min_max"], "round1_wall_s": big["round1_wall_s"]},
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"aggregator CPU seconds per round (utime + stime / rounds), {big['devices']:,} devices",
            value=big["aggregator_cpu_s_per_round"],
            unit="s",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["aggregator_cpu_s_per_round"],
            load=big["load_at_end"],
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"aggregator peak RSS (VmHWM), {big['devices']:,} devices",
            value=big["aggregator_peak_rss_mb"],
            unit="MB",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["aggregator_peak_rss_mb"],
            load=big["load_at_end"],
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"swarm memory per extra device: (peak RSS with {big['devices']:,} - with {small['devices']:,}) / "
            f"{big['devices'] - small['devices']:,}, {out['engine_sets']}",
            value=out["memory_per_extra_device_mb"],
            unit="MB",
            goal="< 1 MB",
            met=out["memory_per_extra_device_mb"] < 1,
            load=big["load_at_end"],
            extra={"swarm_peak_rss_mb": [small["swarm_peak_rss_mb"], big["swarm_peak_rss_mb"]]},
        )
    )


if __name__ == "__main__":
    sys.exit(main())

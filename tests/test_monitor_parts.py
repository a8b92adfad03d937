"""The monitor on a fleet whose messages travel in parts (--max-message-size, protocol/parts.py).

- A scripted publisher on a real mosquitto: a global model in retained parts shows as the
  global model it is; hostile parts (garbage, a layout that overlaps the held one, an index
  repeated with other bytes, a total past the bound, a reassembled message failing its sha256)
  are each ignored with a one-line reason, an incomplete model shows nothing, and the monitor
  process keeps going (an update sent in parts is counted afterwards).
- End to end: a real aggregator with a 30,721-parameter model and --max-message-size at its
  floor, a real device, a mosquitto that drops every message over that size (so a whole global
  model or update could not pass), and `fleetlearn monitor --json` as a process: it shows the
  global model of every round, the device's uploads and the rounds' metrics.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.protocol import (
    MIN_MAX_MESSAGE_SIZE,
    GlobalModel,
    Part,
    Update,
    split_message,
)
from tests.conftest import stop_process
from tests.procs import AggregatorProcess
from tests.test_compress_e2e import LimitedMosquitto, assert_broker_drops_oversized
from tests.test_device import FLEET, start_device, write_config
from tests.test_monitor import RUN, MonitorProcess, Publisher, is_

pytestmark = pytest.mark.mosquitto

LIMIT = MIN_MAX_MESSAGE_SIZE


def parts_of(payload: bytes) -> list[Part]:
    return [Part.decode(p, len(payload)) for p in split_message(payload, LIMIT)]


def test_monitor_reassembles_parts_and_refuses_hostile_ones(mosquitto, tmp_path):
    fleet = "parts1"
    pub = Publisher(mosquitto.url, fleet)
    t = pub.topics
    w = np.arange(40_000, dtype=np.float32)  # 160 kB: three parts under the limit
    g3 = GlobalModel(RUN, 3, "a" * 64, w, total_rounds=5).encode()
    parts = split_message(g3, LIMIT)
    assert len(parts) == 3 and all(len(p) <= LIMIT for p in parts)
    for i, p in enumerate(parts):  # retained before the monitor starts, as the aggregator leaves them
        pub.publish(t.global_part(i), p, retain=True)
    pub.publish(t.global_model, b"", retain=True)
    monitor = MonitorProcess(mosquitto.url, fleet, tmp_path)
    try:
        g = monitor.wait_for(is_("global", round=3), what="the parted global model")
        assert g["model_hash"] == "a" * 64 and g["total_rounds"] == 5 and g["run_id"] == RUN

        # Round 4's model: only its first part ever arrives; then hostile parts.
        g4 = parts_of(GlobalModel(RUN, 4, "b" * 64, w + 1, total_rounds=5).encode())
        pub.publish(t.global_part(0), g4[0].encode())
        p1 = g4[1]
        hostile = {
            "garbage": b"FLRN not a frame at all",
            "overlaps": Part(p1.id, 1, 2, p1.total - 2000, p1.total - 4000, b"\0" * 2000).encode(),
            "different bytes": Part(p1.id, 0, p1.count, p1.total, p1.size, bytes(len(g4[0].data))).encode(),
            "total": Part("e" * 64, 0, 1, 1 << 40, 1 << 40, b"\0" * 1024).encode(),
        }
        whole = GlobalModel(RUN, 9, "c" * 64, w).encode()  # whole parts under a sha256 that is not theirs
        forged = [Part("f" * 64, q.index, q.count, q.total, q.size, q.data) for q in parts_of(whole)]
        for payload in hostile.values():
            pub.publish(t.global_part(1), payload)
        for q in forged:
            pub.publish(t.global_part(q.index), q.encode())
        reasons = [monitor.wait_for(is_("ignored"), what=f"ignored part {i}")["reason"] for i in range(len(hostile) + 1)]
        assert len(reasons) == 5
        for needle in ("overlaps", "different bytes", "total", "sha256"):
            assert sum(needle in r for r in reasons) == 1, (needle, reasons)
        assert all("\n" not in r and len(r) < 300 for r in reasons)

        # Still alive and still reassembling: an update in parts counts as an upload, and the
        # rounds go on; round 4's incomplete model never showed.
        up = Update(RUN, 3, "dev-p", "c" * 64, 100, 1.0, 0.1, "e" * 32, w).encode()
        for p in split_message(up, LIMIT):
            pub.publish(t.update("dev-p"), p)
        u = monitor.wait_for(is_("upload", device_id="dev-p"), what="the parted update")
        assert u["round"] == 3 and u["bytes"] > LIMIT
        pub.round(3, "open")
        monitor.wait_for(is_("round", round=3, state="open"), what="round 3 open")
        assert not [e for e in monitor.events if e["event"] == "global" and e["round"] != 3]
        assert monitor.proc.poll() is None
    finally:
        rc = monitor.stop()
        pub.close()
    assert rc == 0
    assert "Traceback" not in monitor.stderr_path.read_text()


def wide_mlp():
    """13 -> 2048 -> 1: 30,721 parameters, a 123 kB model (over the message floor of ~73 kB)."""
    from torch import nn

    return nn.Sequential(nn.Linear(13, 2048), nn.ReLU(), nn.Linear(2048, 1))


def test_monitor_shows_a_real_run_whose_messages_travel_in_parts(tmp_path, boston_split, boston_shards):
    pytest.importorskip("torch")
    from fleetlearn.export import build_bundle

    x = boston_split["x_train"]
    bundle = tmp_path / "wide"
    build_bundle(
        wide_mlp(),
        bundle,
        model_name="wide-mlp",
        input_shape=(13,),
        loss="mse",
        optimizer="adamw",
        lr=1e-3,
        preprocessing={"mean": x.mean(0).tolist(), "std": x.std(0).tolist()},
        seed=0,
    )
    dev_bundle = tmp_path / "dev-bundle"
    shutil.copytree(bundle, dev_bundle)
    shards, test_npz = boston_shards
    broker = LimitedMosquitto(tmp_path, LIMIT).start()
    fleet = FLEET  # write_config writes tests.test_device.FLEET
    monitor = agg = device = None
    try:
        assert_broker_drops_oversized(broker.url, LIMIT)
        monitor = MonitorProcess(broker.url, fleet, tmp_path)
        monitor.wait_for(is_("connected"), what="connected")
        cfg = write_config(tmp_path, broker.url, dev_bundle, shards[0], device_id="dev-0")
        device = start_device(cfg, tmp_path / "dev-0.log", "--max-rounds", "2")
        monitor.wait_for(is_("device", device_id="dev-0", state="idle"), timeout=60, what="dev-0 online")
        agg = AggregatorProcess(
            tmp_path,
            broker.url,
            fleet,
            tmp_path / "agg",
            "--rounds",
            "2",
            "--min-devices",
            "1",
            "--deadline",
            "90",
            "--max-message-size",
            str(LIMIT),
            "--test-data",
            str(test_npz),
            bundle=bundle,
        )
        globals_ = [monitor.wait_for(is_("global", round=r), timeout=90, what=f"round {r}'s global model") for r in (1, 2)]
        assert all(g["train"] and g["total_rounds"] == 2 for g in globals_)
        assert globals_[0]["model_hash"] == globals_[1]["model_hash"]
        for r in (1, 2):
            up = monitor.wait_for(is_("upload", device_id="dev-0", round=r), timeout=90, what=f"round {r}'s upload")
            assert up["bytes"] > LIMIT  # the whole update, put back together from its parts
            m = monitor.wait_for(is_("metrics", round=r), timeout=90, what=f"round {r} metrics")
            assert m["devices"] == ["dev-0"] and m["test_mse"] > 0
        monitor.wait_for(is_("round", state="finished"), timeout=90, what="the run finishing")
        assert agg.wait(60) == 0, agg.text()[-3000:]
        assert device.wait(60) == 0, (tmp_path / "dev-0.log").read_text()[-3000:]
        assert not [e for e in monitor.events if e["event"] == "ignored"], "every part was whole and honest"
    finally:
        if device is not None:
            stop_process(device)
        if agg is not None:
            agg.stop()
        rc = monitor.stop() if monitor is not None else 0
        broker.stop()
    assert rc == 0
    # Every global model was over the limit: the broker could only have carried it in parts.
    for r in (1, 2):
        assert 4 * np.fromfile(tmp_path / "agg" / "global" / f"round_{r:04d}.f32", dtype="<f4").size > LIMIT

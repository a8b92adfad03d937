"""Compressed updates and messages over a broker's size limit, end to end: a real aggregator and
real device processes on a real mosquitto.

- Boston, 2 devices, 3 rounds, for each of fp16, int8 and top-k: every round closes with no
  refusal, the aggregator decodes every encoding, and the bytes that came in are what the
  encoding promises; top-k devices leave a settled error-feedback residual behind.
- Boston with int8 under a mosquitto that drops anything over the smallest --max-message-size:
  the devices fetch the bundle over MQTT in chunks that fit, and train with int8.
- A 1.66M-parameter CNN (a 6.6 MB global model and updates) through mosquitto configured with
  `message_size_limit 131072`: global models, updates and the bundle all travel in parts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import MIN_MAX_MESSAGE_SIZE
from fleetlearn.edge_runtime.device.feedback import FILE as EF_FILE
from fleetlearn.edge_runtime.device.feedback import SETTLED
from tests.conftest import Broker, mosquitto_binary, stop_process
from tests.peers import Peer
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, start_device, write_config


def big_cnn():
    """1,657,685 parameters on 8x8 single-channel images, 10 classes (the test's own model)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 193), nn.ReLU(),
        nn.Linear(193, 10),
    )  # fmt: skip


class LimitedMosquitto(Broker):
    """mosquitto with `message_size_limit`: it drops every publish whose payload is larger."""

    def __init__(self, workdir: Path, limit: int):
        super().__init__("mosquitto", workdir)
        self.limit = limit

    def start(self) -> LimitedMosquitto:
        import subprocess

        from tests.conftest import ROOT, wait_port

        conf = self.workdir / "mosquitto-limited.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
            f"max_queued_messages 10000\nmessage_size_limit {self.limit}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        )
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT
        )
        wait_port(self.port)
        return self


def assert_broker_drops_oversized(url: str, limit: int) -> None:
    """The limit is real: a payload one byte over it never arrives, one at the limit does."""
    peer = Peer(url, ["limit-check/#"])
    try:
        peer.publish("limit-check/over", b"x" * (limit + 1))
        peer.publish("limit-check/at", b"y" * limit)
        topic, payload = peer.wait_for(lambda t, p: True, timeout=10)
        assert topic == "limit-check/at" and len(payload) == limit
        time.sleep(0.3)
        assert peer.drain() == []
    finally:
        peer.close()


def rounds_of(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]


def run_fleet(
    tmp_path: Path,
    url: str,
    bundle_arg: list[str],
    device_bundles: list[Path],
    shards: list[Path],
    rounds: int,
    *agg_extra: str,
    agg_timeout: float = 180,
    **training,
) -> tuple[Path, list[str]]:
    state = tmp_path / "agg"
    agg = AggregatorProcess(
        tmp_path,
        url,
        FLEET,
        state,
        "--rounds",
        str(rounds),
        "--min-devices",
        str(len(shards)),
        "--deadline",
        "90",
        *bundle_arg,
        *agg_extra,
    )
    devices = []
    try:
        for i, (shard, dev_bundle) in enumerate(zip(shards, device_bundles)):
            cfg = write_config(tmp_path, url, dev_bundle, shard, device_id=f"dev-{i}", **training)
            devices.append(start_device(cfg, tmp_path / f"dev-{i}.log", "--max-rounds", str(rounds)))
        assert agg.wait(agg_timeout) == 0, agg.text()[-3000:]
        for i, proc in enumerate(devices):
            assert proc.wait(60) == 0, (tmp_path / f"dev-{i}.log").read_text()[-3000:]
    finally:
        for proc in devices:
            stop_process(proc)
        agg.stop()
    return state, [(tmp_path / f"dev-{i}.log").read_text() for i in range(len(shards))]


# Bytes of one update frame over raw float32 model bytes (4 n), Boston (n = 1,657): the frame's
# ~290 bytes of header and meta are counted. Upper bounds of what each encoding must achieve.
RATIO = {"fp16": 0.56, "int8:256": 0.31, "topk:0.05": 0.15}


@pytest.mark.parametrize("compression", list(RATIO))
def test_boston_rounds_with_each_encoding(mosquitto, tmp_path, boston_bundle, boston_shards, compression):
    shards, test_npz = boston_shards
    shards = shards[:2]
    state, logs = run_fleet(
        tmp_path,
        mosquitto.url,
        ["--bundle", str(boston_bundle)],
        [boston_bundle] * 2,
        shards,
        3,
        "--compression",
        compression,
        "--test-data",
        str(test_npz),
    )
    rounds = rounds_of(state)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["devices"] == ["dev-0", "dev-1"] and r["rejected"] == 0 for r in rounds)
    assert all(np.isfinite(r["test_mse"]) for r in rounds)
    n = load_bundle(boston_bundle).num_params
    sent = [int(line.split("bytes=")[1].split()[0]) for log in logs for line in log.splitlines() if "event=update_sent" in line]
    assert len(sent) == 6
    assert max(sent) <= RATIO[compression] * 4 * n, sent
    assert all(r["bytes_in"] == sum(sent) // 3 or r["bytes_in"] <= 2 * max(sent) for r in rounds)
    residuals = [tmp_path / f"dev-{i}-state" / EF_FILE for i in range(2)]
    if compression.startswith("topk"):
        for path in residuals:  # settled after the last ack, and holding what top-k has not sent yet
            raw = path.read_bytes()
            assert raw[8:40].decode() == SETTLED
            after = np.frombuffer(raw, "<f4", n, 40 + 4 * n)
            assert np.isfinite(after).all() and np.count_nonzero(after) > n // 2
    else:
        assert not any(p.exists() for p in residuals)


def test_boston_int8_with_bundle_over_a_size_limited_broker(tmp_path, boston_bundle, boston_shards):
    limit = MIN_MAX_MESSAGE_SIZE
    broker = LimitedMosquitto(tmp_path, limit).start()
    try:
        assert_broker_drops_oversized(broker.url, limit)
        shards, test_npz = boston_shards
        shards = shards[:2]
        empty = [tmp_path / f"fetched-{i}" for i in range(2)]  # devices fetch the bundle over MQTT
        state, logs = run_fleet(
            tmp_path,
            broker.url,
            ["--bundle", str(boston_bundle)],
            empty,
            shards,
            2,
            "--compression",
            "int8",
            "--max-message-size",
            str(limit),
            "--chunk-size",
            str(1 << 20),
            "--test-data",
            str(test_npz),
        )
    finally:
        broker.stop()
    rounds = rounds_of(state)
    assert [r["round"] for r in rounds] == [1, 2] and all(r["rejected"] == 0 for r in rounds)
    for log, path in zip(logs, empty):
        assert "event=bundle_installed" in log
        assert load_bundle(path).model_hash == load_bundle(boston_bundle).model_hash
    agg_log = next(tmp_path.glob("agg-*.log")).read_text()
    chunk_size = int(agg_log.split("event=bundle_published")[1].split("chunk_size=")[1].split()[0])
    assert chunk_size < limit < 1 << 20  # --chunk-size 1 MiB was cut down to fit the limit
    # Boston's messages (7 KB updates, a 26 KB bundle) all fit under the floor of 73 KB, so
    # nothing needed parts here: the big CNN test below is the one whose messages do.


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_big_cnn_round_trips_through_mosquitto_message_size_limit(tmp_path, compression):
    pytest.importorskip("torch")
    limit = 131072
    broker = LimitedMosquitto(tmp_path, limit).start()
    rng = np.random.default_rng(0)
    shards = []
    for i in range(2):
        p = tmp_path / f"cnn{i}.npz"
        np.savez(p, x=rng.standard_normal((32, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 32))
        shards.append(p)
    try:
        assert_broker_drops_oversized(broker.url, limit)
        agg_bundle = tmp_path / "agg" / "bundle"
        # dev-0 fetches the bundle over MQTT (in chunks under the limit); dev-1 is given it.
        device_bundles = [tmp_path / "fetched", agg_bundle]
        state = tmp_path / "agg"
        agg = AggregatorProcess(
            tmp_path,
            broker.url,
            FLEET,
            state,
            "--rounds",
            "2",
            "--min-devices",
            "2",
            "--deadline",
            "240",
            "--model",
            "tests.test_compress_e2e:big_cnn",
            "--input-shape",
            "1,8,8",
            "--loss",
            "cross_entropy",
            "--max-message-size",
            str(limit),
            "--compression",
            compression,
        )
        deadline = time.monotonic() + 240
        while not (agg_bundle / "manifest.json").exists():  # exported on start
            assert agg.proc.poll() is None and time.monotonic() < deadline, agg.text()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)  # the manifest is written last; give the files a moment to settle
        devices = []
        try:
            for i, (shard, b) in enumerate(zip(shards, device_bundles)):
                cfg = write_config(tmp_path, broker.url, b, shard, device_id=f"dev-{i}", max_steps=2)
                devices.append(start_device(cfg, tmp_path / f"dev-{i}.log", "--max-rounds", "2"))
            assert agg.wait(420) == 0, agg.text()[-3000:]
            for i, proc in enumerate(devices):
                assert proc.wait(60) == 0, (tmp_path / f"dev-{i}.log").read_text()[-3000:]
        finally:
            for proc in devices:
                stop_process(proc)
            agg.stop()
    finally:
        broker.stop()
    n = load_bundle(agg_bundle).num_params
    assert n == 1_657_685
    rounds = rounds_of(state)
    assert [r["round"] for r in rounds] == [1, 2] and all(
        r["devices"] == ["dev-0", "dev-1"] and r["rejected"] == 0 for r in rounds
    )
    per_update = 4 * n if compression == "none" else n  # float32, or int8 codes (+ scales)
    assert all(
        2 * per_update < r["bytes_in"] < 2 * 1.05 * per_update + 4096 for r in rounds
    )  # two whole updates came in, in parts
    sent = [
        line for i in range(2) for line in (tmp_path / f"dev-{i}.log").read_text().splitlines() if "event=update_sent" in line
    ]
    assert len(sent) == 4
    assert "event=bundle_installed" in (tmp_path / "dev-0.log").read_text()
    w = [np.fromfile(state / "global" / f"round_{r:04d}.f32", dtype="<f4") for r in range(3)]
    assert all(x.size == n for x in w) and not np.array_equal(w[0], w[2])

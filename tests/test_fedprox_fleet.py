"""FedProx over MQTT: real device processes (one per engine) on mosquitto, the aggregator's flags
and their bad values, and a device whose bundle has no proximal term asked for mu > 0.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.data import load_dataset
from fleetlearn.edge_runtime.core.protocol import GlobalModel, RoundConfig, Status, Topics, Update
from fleetlearn.edge_runtime.engines.select import open_engine
from tests.conftest import ROOT, stop_process
from tests.peers import Peer
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, initial_weights, start_device, wait_log, write_config

T = Topics(FLEET)
MU = 0.01


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory, boston_split):
    """boston-mlp exported without the proximal term (as every bundle before FedProx was)."""
    from fleetlearn.export import build_bundle, resolve_model

    model, _ = resolve_model("boston-mlp", seed=0)
    x = boston_split["x_train"]
    out = tmp_path_factory.mktemp("plain") / "boston-plain"
    build_bundle(model, out, model_name="boston-mlp", input_shape=(13,), loss="mse", seed=0, proximal=False,
                 preprocessing={"mean": x.mean(0).tolist(), "std": x.std(0).tolist()})  # fmt: skip
    return out


def _global(bundle, run_id: str, rnd: int, mu: float | None, weights=None) -> GlobalModel:
    m = load_bundle(bundle)
    w = initial_weights(bundle) if weights is None else weights
    return GlobalModel(run_id=run_id, round=rnd, model_hash=m.model_hash, weights=w, total_rounds=5, deadline=time.time() + 60,
                       config=RoundConfig(batch_size=8, local_epochs=1, lr=0.01, proximal_mu=mu))  # fmt: skip


@pytest.mark.parametrize("engine", ["ort-training", "portable"])
def test_device_trains_with_the_rounds_mu(engine, mosquitto, tmp_path, boston_bundle, boston_shards):
    """The device's delta is exactly local training with the round's mu (here, same engine, same
    seed), and not what mu = 0 gives: mu reached the graph through the round config."""
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0], engine=f'"{engine}"')
    peer = Peer(mosquitto.url, [T.all_updates])
    run_id = secrets.token_hex(16)
    m = load_bundle(boston_bundle)
    w0 = initial_weights(boston_bundle) + np.float32(0.02)  # not the bundle's own weights
    g = _global(boston_bundle, run_id, 1, 0.5, w0)  # a large mu, so the check below has teeth
    peer.publish(T.global_model, g.encode(), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"), timeout=60)
        update = Update.decode(payload, m.num_params)
    finally:
        stop_process(proc)
        peer.close()
    assert "mu=0.5" in log.read_text()
    data = load_dataset(shards[0], m)

    def local(mu: float) -> np.ndarray:
        e = open_engine(boston_bundle, m, engine)
        e.set_weights(w0)
        e.train(data, batch_size=8, epochs=1, seed=[0, 1, zlib.crc32(b"dev-0")], lr=0.01, mu=mu)
        return e.get_weights() - w0

    np.testing.assert_array_equal(update.delta, local(0.5))
    assert np.abs(local(0.0) - update.delta).max() > 1e-4


def test_a_bundle_without_the_term_sits_the_round_out_and_says_so(mosquitto, tmp_path, plain_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, plain_bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_updates, T.all_status])
    run_id = secrets.token_hex(16)
    peer.publish(T.global_model, _global(plain_bundle, run_id, 1, MU).encode(), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        _, payload = peer.wait_for(
            lambda t, p: t == T.status("dev-0") and bool(p) and Status.decode(p).state == "error", timeout=60
        )
        status = Status.decode(payload)
        assert status.round == 1 and "no proximal term" in status.detail and "proximal_mu 0.01" in status.detail, status
        wait_log(log, "event=sitting_out")
        time.sleep(1.0)
        assert not [t for t, _ in peer.drain() if t == T.update("dev-0")], "it must not train or upload"
        assert proc.poll() is None, "the device stays up"
        # The next round without mu: it trains as ever.
        peer.publish(T.global_model, _global(plain_bundle, run_id, 2, None).encode(), retain=True)
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"), timeout=60)
        assert Update.decode(payload, load_bundle(plain_bundle).num_params).round == 2
    finally:
        stop_process(proc)
        peer.close()
    assert log.read_text().count("event=sitting_out") == 1


def test_fedprox_end_to_end_one_device_per_engine(mosquitto, tmp_path, boston_bundle, boston_shards):
    """--strategy fedprox --proximal-mu 0.01: 3 rounds, a device on each engine, both in every round."""
    shards, test_npz = boston_shards
    state = tmp_path / "agg"
    agg = AggregatorProcess(tmp_path, mosquitto.url, FLEET, state, "--rounds", "3", "--min-devices", "2", "--deadline", "60",
                            "--test-data", str(test_npz), "--lr", "0.003", "--strategy", "fedprox", "--proximal-mu", str(MU),
                            bundle=boston_bundle)  # fmt: skip
    devices = []
    try:
        for i, engine in enumerate(["ort-training", "portable"]):
            cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[i], device_id=f"dev-{i}", engine=f'"{engine}"')
            devices.append(start_device(cfg, tmp_path / f"dev-{i}.log", "--max-rounds", "3"))
        assert agg.wait(180) == 0, agg.text()[-3000:]
    finally:
        for proc in devices:
            stop_process(proc)
        agg.stop()
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["devices"] == ["dev-0", "dev-1"] for r in rounds)
    assert all(r["strategy"] == "fedavg" and r["proximal_mu"] == MU for r in rounds)  # FedAvg's aggregation, devices' mu
    assert "proximal_mu=0.01" in agg.text()
    for i, engine in enumerate(["ort-training", "portable"]):
        text = (tmp_path / f"dev-{i}.log").read_text()
        assert f"engine={engine}" in text and text.count("event=update_sent") == 3 and text.count("mu=0.01") == 3, text[-2000:]
    assert rounds[-1]["test_mse"] < rounds[0]["test_mse"]


# ------------------------------------------------------------------ bad input: one line, exit 2


def _aggregator(tmp_path, bundle, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetlearn.cli", "aggregator", "--broker", "mqtt://127.0.0.1:1", "--rounds", "2",
                           "--min-devices", "1", "--state-dir", str(tmp_path / "s"), "--bundle", str(bundle), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "fedprox"], "--strategy fedprox needs --proximal-mu MU > 0"),
    (["--strategy", "fedprox", "--proximal-mu", "0"], "--strategy fedprox needs --proximal-mu MU > 0"),
    (["--proximal-mu", "-0.1"], "--proximal-mu must be a finite number in [0, 1000]"),
    (["--strategy", "fedprox", "--proximal-mu", "nan"], "--proximal-mu must be a finite number"),
    (["--strategy", "fedadam", "--proximal-mu", "inf"], "--proximal-mu must be a finite number"),
    (["--proximal-mu", "abc"], "--proximal-mu: invalid float value"),
])  # fmt: skip
def test_bad_proximal_input_is_one_line_exit_2(tmp_path, boston_bundle, args, needle):
    r = _aggregator(tmp_path, boston_bundle, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert needle in lines[-1] and not any("Traceback" in line for line in lines), r.stderr
    assert len([line for line in lines if line.startswith("fleetlearn aggregator: error")]) == 1, r.stderr


def test_mu_with_a_bundle_without_the_term_is_refused_at_start(tmp_path, plain_bundle):
    r = _aggregator(tmp_path, plain_bundle, "--strategy", "fedavgm", "--proximal-mu", "0.01")
    assert r.returncode == 2 and "needs a bundle with FedProx's proximal term" in r.stderr.strip().splitlines()[-1], r.stderr

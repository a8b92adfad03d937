"""The device agent as a real process on a real broker, with this test as the aggregator peer.

Every hostile or broken input must cost the device one log line with the reason: it stays up,
its state dir intact, and it still trains correctly when a good global model comes.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, RoundConfig, RoundState, Status, Topics, Update
from tests.conftest import ROOT, stop_process
from tests.peers import Peer

FLEET = "devtest"
T = Topics(FLEET)


def write_config(tmp: Path, broker_url: str, bundle: Path, data: Path, device_id: str = "dev-0", **training) -> Path:
    cfg = tmp / f"{device_id}.toml"
    t = {"batch_size": 8, "local_epochs": 1, "threads": 1, **training}
    cfg.write_text(
        f'device_id = "{device_id}"\nfleet = "{FLEET}"\nbroker = "{broker_url}"\nbundle = "{bundle}"\n'
        f'data = "{data}"\nstate_dir = "{tmp / (device_id + "-state")}"\n\n[training]\n'
        + "".join(f"{k} = {v}\n" for k, v in t.items())
    )
    return cfg


def start_device(cfg: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg), *extra],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        cwd=ROOT,
    )


def wait_log(log: Path, needle: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in device log:\n{log.read_text(errors='replace')[-3000:]}")


def initial_weights(bundle: Path) -> np.ndarray:
    from fleetlearn.edge_runtime.engines.trainer import Trainer

    return Trainer(bundle, load_bundle(bundle)).get_weights()


def global_frame(bundle: Path, run_id: str, round_: int, weights: np.ndarray | None = None, **kw) -> bytes:
    m = load_bundle(bundle)
    w = initial_weights(bundle) if weights is None else weights
    return GlobalModel(
        run_id=run_id,
        round=round_,
        model_hash=kw.pop("model_hash", m.model_hash),
        weights=w,
        total_rounds=5,
        deadline=time.time() + 60,
        config=RoundConfig(),
        **kw,
    ).encode()


def test_device_trains_and_delivers_an_intact_update(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_updates, T.all_status])
    run_id = secrets.token_hex(16)
    w0 = initial_weights(boston_bundle)
    peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1, w0), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"))
        m = load_bundle(boston_bundle)
        update = Update.decode(payload, m.num_params)
        assert update.round == 1 and update.run_id == run_id and update.model_hash == m.model_hash
        assert update.samples == len(np.load(shards[0])["y"])
        assert np.isfinite(update.train_loss) and update.train_s > 0
        assert np.abs(update.delta).max() > 0, "training changed nothing"
        # The delta is exactly what the same local training gives here (same seed, same data).
        peer.publish(T.ack("dev-0"), Ack(run_id, 1, "dev-0", update.nonce, True).encode())
        assert proc.wait(30) == 0, log.read_text()
        state = json.loads((tmp_path / "dev-0-state" / "device_state.json").read_text())
        assert state["last_round"] == 1 and state["pending_round"] == 0
        assert not (tmp_path / "dev-0-state" / "pending_update.bin").exists()
    finally:
        stop_process(proc)
        peer.close()


def test_unacknowledged_update_is_resent_after_restart_and_never_retrained(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[1], device_id="dev-1")
    peer = Peer(mosquitto.url, [T.all_updates])
    run_id = secrets.token_hex(16)
    peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log)
    try:
        _, first = peer.wait_for(lambda t, p: t == T.update("dev-1"))
        stop_process(proc)  # no ack: the update stays pending on disk
        proc = start_device(cfg, tmp_path / "device2.log")
        _, again = peer.wait_for(lambda t, p: t == T.update("dev-1"))
        assert again == first, "a restart must re-send the same bytes (same nonce), not train again"
        nonce = Update.decode(again, load_bundle(boston_bundle).num_params).nonce
        peer.publish(T.ack("dev-1"), Ack(run_id, 1, "dev-1", nonce, True).encode())
        wait_log(tmp_path / "device2.log", "event=update_acknowledged")
    finally:
        stop_process(proc)
        peer.close()


def test_pending_update_dropped_when_round_closes(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_updates])
    run_id = secrets.token_hex(16)
    peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        peer.wait_for(lambda t, p: t == T.update("dev-0"))
        peer.publish(T.round, RoundState(run_id, 1, "closed", total_rounds=5).encode(), retain=True)
        assert proc.wait(30) == 0
        assert "event=update_dropped" in log.read_text()
        assert not (tmp_path / "dev-0-state" / "pending_update.bin").exists()
    finally:
        stop_process(proc)
        peer.close()


HOSTILE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty-header": lambda good: b"FLRN",
    "bad-magic": lambda good: b"XXXX" + good[4:],
    "padded": lambda good: good + b"\x00" * 7,
    "flipped-body-bit": lambda good: good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:],
    "json-garbage": lambda good: b'{"v":1,"round":',
    "huge-meta-length": lambda good: good[:8] + (2**31).to_bytes(4, "little") + good[12:],
    "not-utf8": lambda good: b"\xff\xfe" * 40,
}


def test_hostile_and_broken_input_costs_one_line_and_never_the_device(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_updates, T.all_status])
    run_id = secrets.token_hex(16)
    m = load_bundle(boston_bundle)
    good = global_frame(boston_bundle, run_id, 1)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log)
    try:
        peer.wait_for(lambda t, p: t == T.status("dev-0") and Status.decode(p).state == "idle")
        for name, make in HOSTILE.items():
            peer.publish(T.global_model, make(good))
        # a global model of the wrong size, and one with NaN weights
        w = initial_weights(boston_bundle)
        peer.publish(T.global_model, GlobalModel(run_id, 1, m.model_hash, w[:-1]).encode())
        bad = w.copy()
        bad[3] = np.nan
        peer.publish(T.global_model, GlobalModel(run_id, 1, m.model_hash, bad).encode())
        peer.publish(T.ack("dev-0"), b"\x00garbage")
        peer.publish(T.round, b'{"v":1,"state":"exploded"}')
        peer.publish(T.bundle, b'{"v":1,"model_hash":"zz"}')
        # a model version this device does not have (and nobody announces): it waits, it does not train
        peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1, model_hash="ab" * 32))
        wait_log(log, "event=model_mismatch")
        text = wait_log(log, "state")  # all handled
        time.sleep(1.0)
        text = log.read_text()
        rejected = text.count("event=message_rejected")
        assert rejected >= len(HOSTILE) + 2 + 3, text[-4000:]
        assert "Traceback" not in text
        assert proc.poll() is None, "the device died"
        # ...and the device still works: a good global model gets a good update.
        peer.publish(T.global_model, good)
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"))
        assert Update.decode(payload, m.num_params).round == 1
    finally:
        stop_process(proc)
        peer.close()


@pytest.mark.parametrize(
    "case,content,reason",
    [
        ("missing", None, "not found"),
        ("empty", b"", "empty"),
        ("ragged", b"a,b,c\n1,2,3\n4,5\n", "ragged"),
        ("nan", "nan", "NaN"),
    ],
)
def test_broken_local_data_reports_error_and_stays_up(mosquitto, tmp_path, boston_bundle, case, content, reason):
    data = tmp_path / ("data.npz" if case == "nan" else "data.csv")
    if content == "nan":
        x = np.ones((10, 13))
        x[2, 5] = np.nan
        np.savez(data, x=x, y=np.ones(10))
    elif content is not None:
        data.write_bytes(content)
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, data)
    peer = Peer(mosquitto.url, [T.all_status])
    run_id = secrets.token_hex(16)
    peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log)
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.status("dev-0") and Status.decode(p).state == "error")
        assert reason in Status.decode(payload).detail
        text = wait_log(log, "event=cannot_train")
        assert reason in text and "Traceback" not in text
        assert proc.poll() is None
        assert json.loads((tmp_path / "dev-0-state" / "device_state.json").read_text())["run_id"] == run_id
    finally:
        stop_process(proc)
        peer.close()


def test_corrupt_bundle_is_reported_and_device_waits(mosquitto, tmp_path, boston_bundle, boston_shards):
    import shutil

    shards, _ = boston_shards
    bundle = tmp_path / "bundle"
    shutil.copytree(boston_bundle, bundle)
    with open(bundle / "eval_model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    cfg = write_config(tmp_path, mosquitto.url, bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_status])
    peer.publish(T.global_model, global_frame(boston_bundle, secrets.token_hex(16), 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log)
    try:
        text = wait_log(log, "event=bundle_unavailable")
        assert "sha256" in text
        peer.wait_for(lambda t, p: t == T.status("dev-0") and Status.decode(p).state == "fetching")
        assert proc.poll() is None
    finally:
        stop_process(proc)
        peer.close()


def test_bad_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('device_id = "a/b"\nfleet = "f"\nbroker = "mqtt://x"\nbundle = "b"\ndata = "d"\nstate_dir = "s"\n')
    r = subprocess.run(
        [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "device_id" in r.stderr


def test_pending_update_survives_a_lost_state_file(mosquitto, tmp_path, boston_bundle, boston_shards):
    """Power-cut model: the pending update file is fsynced, device_state.json is not. With the
    state file gone, the device still re-sends the pending bytes instead of training anew."""
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    peer = Peer(mosquitto.url, [T.all_updates])
    run_id = secrets.token_hex(16)
    peer.publish(T.global_model, global_frame(boston_bundle, run_id, 1), retain=True)
    proc = start_device(cfg, tmp_path / "device.log")
    try:
        _, first = peer.wait_for(lambda t, p: t == T.update("dev-0"))
        stop_process(proc, sig=9)
        (tmp_path / "dev-0-state" / "device_state.json").unlink()
        proc = start_device(cfg, tmp_path / "device2.log")
        _, again = peer.wait_for(lambda t, p: t == T.update("dev-0"))
        assert again == first
        assert "event=pending_update_recovered" in wait_log(tmp_path / "device2.log", "event=update_resent")
    finally:
        stop_process(proc)
        peer.close()


def test_diverged_local_training_is_reported_not_sent(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    with np.load(shards[0]) as d:
        # Finite, so the data check passes, but far beyond what float32 activations survive.
        np.savez(tmp_path / "huge.npz", x=d["x"] * 1e30, y=d["y"])
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, tmp_path / "huge.npz")
    peer = Peer(mosquitto.url, [T.all_updates, T.all_status])
    run_id = secrets.token_hex(16)
    m = load_bundle(boston_bundle)
    w = initial_weights(boston_bundle)
    peer.publish(T.global_model, GlobalModel(run_id, 1, m.model_hash, w, total_rounds=2).encode(), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log)
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.status("dev-0") and Status.decode(p).state == "error")
        assert "diverged" in Status.decode(payload).detail
        assert "event=training_diverged" in log.read_text() and "Traceback" not in log.read_text()
        assert not [t for t, _ in peer.drain() if t == T.update("dev-0")]
        assert proc.poll() is None
    finally:
        stop_process(proc)
        peer.close()


@pytest.mark.parametrize("start_with", ["empty", "other-model"])
def test_device_fetches_the_announced_bundle_and_joins_the_round(
    amqtt_broker, tmp_path, boston_bundle, boston_shards, start_with
):
    """Model distribution over the air: a device whose bundle directory is empty, or holds
    another model version, fetches the aggregator's bundle, verifies it, and trains."""
    import shutil

    from tests.procs import AggregatorProcess

    shards, test_npz = boston_shards
    bundle = tmp_path / "device-bundle"
    if start_with == "other-model":
        from fleetlearn.export import build_bundle, resolve_model

        model, _ = resolve_model("boston-mlp", seed=1)
        build_bundle(model, bundle, model_name="boston-mlp", input_shape=(13,), loss="mse", optimizer="sgd", lr=1e-3, seed=1)
        assert load_bundle(bundle).model_hash != load_bundle(boston_bundle).model_hash
    else:
        bundle.mkdir()
    cfg = write_config(tmp_path, amqtt_broker.url, bundle, shards[0])
    agg = AggregatorProcess(
        tmp_path,
        amqtt_broker.url,
        FLEET,
        tmp_path / "agg",
        "--rounds",
        "1",
        "--min-devices",
        "1",
        "--deadline",
        "60",
        "--test-data",
        str(test_npz),
        bundle=boston_bundle,
    )
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        assert agg.wait(90) == 0, agg.text()[-3000:]
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert "event=bundle_installed" in log.read_text()
        assert load_bundle(bundle).model_hash == load_bundle(boston_bundle).model_hash
        rounds = [json.loads(line) for line in (tmp_path / "agg" / "rounds.jsonl").read_text().splitlines()]
        assert rounds[0]["devices"] == ["dev-0"]
        assert not list(tmp_path.glob(".device-bundle.*")), "staging or old bundle left behind"
        shutil.rmtree(bundle)
    finally:
        stop_process(proc)
        agg.stop()

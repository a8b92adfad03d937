"""Update signing with real processes on real mosquitto: a signed round end to end on a broker
from `fleetlearn broker-config --signing-keys`, an aggregator that rejects forged, unsigned and
replayed updates from scripted paho peers, and a device that rejects forged global models.
Nothing is mocked; the keys are the ones broker-config writes or the helpers flash uses."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core import signing
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, BundleAnnouncement, GlobalModel, RoundConfig, Update
from tests import test_aggregator as ta
from tests import test_device as td
from tests.conftest import ROOT, free_port, stop_process
from tests.peers import Peer
from tests.test_aggregator import agg_factory  # noqa: F401  (fixture)
from tests.test_security_broker import Client, generate, start_broker


def key_dir(tmp: Path, devices: tuple[str, ...]) -> tuple[Path, dict[str, tuple]]:
    """Each device's key pair, made as flash makes them; DIR/<id>.pub for --device-keys."""
    pubs = tmp / "device-pubs"
    pubs.mkdir()
    keys = {}
    for d in devices:
        priv, pub = signing.new_key_pair()
        (pubs / f"{d}.pub").write_bytes(pub)
        keys[d] = (signing.parse_private_key(priv, d), signing.parse_public_key(pub, d))
    return pubs, keys


def signed_by(key, payload: bytes) -> bool:
    frame_sig_len = int.from_bytes(payload[20:22], "little")
    return frame_sig_len == 64 and signing.verify(key, payload[-64:], payload[:-64])


# ---------------------------------------------------------------------------------------


def test_signed_round_end_to_end_with_broker_config_keys(tmp_path, boston_bundle, boston_shards):
    """broker-config --signing-keys -> mosquitto with its ACL, the aggregator with the fleet's
    keys, two device processes that fetch the bundle over MQTT (signed announcement), verify
    each signed global model and sign their updates: two rounds, both devices in each."""
    shards, test_npz = boston_shards
    port = free_port()
    fleet = generate(tmp_path / "fleet", port, "--signing-keys", "--bundle", str(boston_bundle))
    broker = start_broker(fleet, port)
    url = f"mqtt://127.0.0.1:{port}"
    state = tmp_path / "agg-state"
    devices = ("dev-0", "dev-1")
    agg_pub = signing.load_public_key(fleet / "aggregator" / "signing.pub")
    dev_pub = {d: signing.load_public_key(fleet / "devices" / d / "signing.pub") for d in devices}
    watcher = Client(port, "monitor", (fleet / "monitor" / "mqtt-password").read_text().strip()).connected()
    watcher.subscribe("fleetlearn/sec/#")
    procs: list[subprocess.Popen] = []
    try:
        agg = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleetlearn.cli",
                "aggregator",
                "--bundle",
                str(boston_bundle),
                "--broker",
                url,
                "--fleet",
                "sec",
                "--rounds",
                "2",
                "--min-devices",
                "2",
                "--deadline",
                "90",
                "--state-dir",
                str(state),
                "--test-data",
                str(test_npz),
                "--username",
                "aggregator",
                "--password-file",
                str(fleet / "aggregator" / "mqtt-password"),
                "--device-keys",
                str(fleet / "aggregator" / "device-keys"),
                "--signing-key",
                str(fleet / "aggregator" / "signing.key"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "agg.log", "wb"),
            cwd=ROOT,
        )
        procs.append(agg)
        for i, device in enumerate(devices):
            cfg = tmp_path / f"{device}.toml"
            cfg.write_text(
                f'device_id = "{device}"\nfleet = "sec"\nbroker = "{url}"\nmqtt_protocol = "5"\n'
                f'bundle = "{tmp_path / (device + "-bundle")}"\ndata = "{shards[i]}"\nstate_dir = "{tmp_path / (device + "-state")}"\n\n'
                "[training]\nbatch_size = 8\nlocal_epochs = 1\nthreads = 1\n\n"
                f'[auth]\nusername = "{device}"\npassword_file = "{fleet / "devices" / device / "mqtt-password"}"\n\n'
                f'[signing]\nkey_file = "{fleet / "devices" / device / "signing.key"}"\naggregator_public_key = "{fleet / "aggregator" / "signing.pub"}"\n'
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg), "--max-rounds", "2"],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"{device}.log", "wb"),
                    cwd=ROOT,
                )
            )
        assert agg.wait(240) == 0, (tmp_path / "agg.log").read_text()[-3000:]
        for device, proc in zip(devices, procs[1:]):
            assert proc.wait(60) == 0, (tmp_path / f"{device}.log").read_text()[-3000:]
        records = ta.rounds_log(state)
        assert [r["round"] for r in records] == [1, 2]
        assert all(r["devices"] == list(devices) and r["rejected"] == 0 for r in records), records
        agg_log = (tmp_path / "agg.log").read_text()
        assert "event=signing" in agg_log and "device_keys=2 require_signatures=yes globals_signed=yes" in agg_log
        assert "event=update_rejected" not in agg_log and "event=update_unverified" not in agg_log
        for device in devices:
            log = (tmp_path / f"{device}.log").read_text()
            assert f"event=signing device={device} signs_updates=yes" in log and "verifies_globals=yes" in log
            assert "event=bundle_installed" in log and "event=message_rejected" not in log, log[-3000:]
        # What crossed the broker: every update signed by its device, every global model and the
        # bundle announcement by the aggregator.
        seen = []
        while not watcher.messages.empty():
            seen.append(watcher.messages.get_nowait())
        updates = [(t, p) for t, p in seen if "/update/" in t]
        assert len(updates) >= 4
        for topic, payload in updates:
            device = topic.rsplit("/", 1)[1]
            assert signed_by(dev_pub[device], payload), topic
            assert not signed_by(dev_pub[[d for d in devices if d != device][0]], payload)
        globals_ = [p for t, p in seen if t == "fleetlearn/sec/global" and p]
        assert len(globals_) >= 3 and all(signed_by(agg_pub, p) for p in globals_)
        (announcement,) = {p for t, p in seen if t == "fleetlearn/sec/bundle" and p}
        assert signing.verify_announcement(agg_pub, announcement)
        assert not (state / "aggregator-signing.key").exists(), "--signing-key was given: no second key"
    finally:
        for proc in procs:
            stop_process(proc)
        watcher.c.loop_stop()
        stop_process(broker.proc)


def test_aggregator_rejects_unsigned_forged_and_replayed_updates(mosquitto, boston_bundle, tmp_path, agg_factory):  # noqa: F811
    """Every bad update is acked accepted=false with its reason and logged with its device; the
    aggregator stays up, and the clean devices' rounds are exactly their own updates. The replay
    ledger survives a kill -9."""
    state = tmp_path / "state"
    pubs, keys = key_dir(tmp_path, ("dev-a", "dev-b", "dev-c"))
    args = ta.common(3, 2, 2, 60)
    agg = agg_factory.agg(mosquitto.url, boston_bundle, state, *args, "--device-keys", str(pubs))
    a, b, c, x = (agg_factory.peer(mosquitto.url, d) for d in ("dev-a", "dev-b", "dev-c", "dev-x"))
    ka, kb, kc = (keys[d][0] for d in ("dev-a", "dev-b", "dev-c"))
    g1 = a.global_model(1)
    n = g1.weights.size
    agg_pub = signing.load_public_key(state / "aggregator-signing.pub")
    assert os.stat(state / "aggregator-signing.key").st_mode & 0o777 == 0o600
    assert signing.verify(agg_pub, g1.signature, g1.signed_part), "global models are signed with the state dir's key"

    def refused(peer: ta.Peer, u: Update, payload: bytes, needle: str) -> Ack:
        before = sum(1 for k in peer.acks() if k.nonce == u.nonce)
        peer.send(payload, device=u.device_id)
        ack = peer.ack(u.nonce, nth=before + 1)
        assert not ack.accepted and needle in ack.reason, ack
        assert ack.round == u.round and ack.device_id == u.device_id
        return ack

    zeros = np.zeros(n, np.float32)
    # Round 1: four kinds of bad update, then the two clean devices.
    u = c.update(g1, zeros, 5)
    refused(c, u, u.encode(), "unsigned update")
    u = c.update(g1, zeros, 5)
    raw = bytearray(u.encode(sign=kc.sign))
    raw[-1] ^= 0x01  # one flipped bit in the signature
    refused(c, u, bytes(raw), "bad signature")
    u = c.update(g1, zeros, 5, device_id="dev-a")  # dev-c's key, posted as dev-a
    refused(a, u, u.encode(sign=kc.sign), "does not verify with device dev-a's registered key")
    u = x.update(g1, zeros, 5)
    refused(
        x,
        u,
        u.encode(sign=signing.parse_private_key(signing.new_key_pair()[0], "k").sign),
        "no signing key is registered for device dev-x",
    )
    ua1 = a.update(g1, np.full(n, 0.01, np.float32), 10)
    ub1 = b.update(g1, np.full(n, -0.02, np.float32), 30)
    a.send(ua1.encode(sign=ka.sign))
    assert a.ack(ua1.nonce).accepted
    a.send(ua1.encode(sign=ka.sign))  # the ack was lost: the same bytes again
    assert a.ack(ua1.nonce, nth=2).accepted and "counted once" in a.ack(ua1.nonce, nth=2).reason
    b.send(ub1.encode(sign=kb.sign))
    assert b.ack(ub1.nonce).accepted

    # Round 2: the round-1 update re-posted is the one already counted (acked, not counted
    # again); a new update reusing its nonce is a replay.
    g2 = a.global_model(2)
    assert signing.verify(agg_pub, g2.signature, g2.signed_part)
    a.send(ua1.encode(sign=ka.sign))
    again = a.ack(ua1.nonce, nth=3)
    assert again.accepted and "counted before it closed" in again.reason
    reuse = a.update(g2, np.full(n, 5.0, np.float32), 1000, nonce=ua1.nonce)
    a.send(reuse.encode(sign=ka.sign))
    replay = a.wait(lambda t, p: t == ta.T.ack("dev-a") and (k := Ack.decode(p)).round == 2 and k.nonce == ua1.nonce and k)
    assert not replay.accepted and f"replay: nonce {ua1.nonce[:8]} was already used in round 1" in replay.reason
    ua2, ub2 = a.update(g2, np.full(n, 0.03, np.float32), 11), b.update(g2, np.full(n, 0.0, np.float32), 31)
    a.send(ua2.encode(sign=ka.sign))
    b.send(ub2.encode(sign=kb.sign))
    assert a.ack(ua2.nonce).accepted and b.ack(ub2.nonce).accepted
    a.global_model(3)

    # kill -9 and restart on the same state dir: keys and the replay ledger come back.
    agg.kill9()
    agg2 = agg_factory.agg(mosquitto.url, boston_bundle, state, *args, name="agg2")
    ta.wait_until(lambda: "event=round_open round=3" in agg2.text())
    assert "require_signatures=yes" in agg2.text() and "resumed_after=2" in agg2.text()
    g3 = a.global_model(3)
    # Round 3: the captured round-1 update is late; a different update under a round-2 nonce,
    # and a round-3 update under a round-1 nonce, are replays.
    refused(a, ua1, ua1.encode(sign=ka.sign), "round 1 closed")
    forged2 = b.update(g2, np.full(n, 9.0, np.float32), 31, nonce=ub2.nonce)
    b.send(forged2.encode(sign=kb.sign))
    r = b.wait(lambda t, p: t == ta.T.ack("dev-b") and "different update" in (k := Ack.decode(p)).reason and k)
    assert not r.accepted and f"nonce {ub2.nonce[:8]} was already used for a different update in round 2" in r.reason
    reuse3 = a.update(g3, zeros, 10, nonce=ua1.nonce)
    a.send(reuse3.encode(sign=ka.sign))
    r = a.wait(lambda t, p: t == ta.T.ack("dev-a") and (k := Ack.decode(p)).round == 3 and k.nonce == ua1.nonce and k)
    assert not r.accepted and "already used in round 1" in r.reason
    ua3, ub3 = a.update(g3, zeros, 12), b.update(g3, zeros, 32)
    a.send(ua3.encode(sign=ka.sign))
    b.send(ub3.encode(sign=kb.sign))
    assert agg2.wait() == 0, agg2.text()[-3000:]

    records = ta.rounds_log(state)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["devices"] == ["dev-a", "dev-b"] for r in records)
    assert [r["samples"] for r in records] == [40, 42, 44], "only the clean updates counted, each once"
    w1 = ta.state_weights(state, 1)
    np.testing.assert_allclose(
        w1, g1.weights.astype(np.float64) + (10 * 0.01 + 30 * np.float64(np.float32(-0.02))) / 40, rtol=1e-6, atol=1e-7
    )
    final = a.global_model(4)
    assert not final.train and signing.verify(agg_pub, final.signature, final.signed_part)
    rejected = [line for line in (agg.text() + agg2.text()).splitlines() if "event=update_rejected" in line]
    assert len(rejected) == 4 + 1 + 3
    assert all("device=dev-" in line and "reason=" in line for line in rejected)
    for needle in (
        "unsigned update",
        "bad signature",
        "dev-a's registered key",
        "no signing key",
        "replay: nonce",
        "round 1 closed",
        "different update",
    ):
        assert any(needle in line for line in rejected), needle


def test_allow_unsigned_and_require_without_keys(mosquitto, boston_bundle, tmp_path, agg_factory):  # noqa: F811
    """--allow-unsigned takes unsigned updates (logged once per device) but still checks every
    signature it can; --require-signatures with no device keys is a usage error (exit 2)."""
    pubs, keys = key_dir(tmp_path, ("dev-a", "dev-b"))
    bad = agg_factory.agg(
        mosquitto.url, boston_bundle, tmp_path / "empty-state", *ta.common(1, 1), "--require-signatures", name="bad"
    )
    assert bad.wait(60) == 2 and "--require-signatures: no device keys" in bad.text()

    state = tmp_path / "state"
    agg = agg_factory.agg(
        mosquitto.url, boston_bundle, state, *ta.common(1, 2, 2, 60), "--device-keys", str(pubs), "--allow-unsigned"
    )
    a, b = agg_factory.peer(mosquitto.url, "dev-a"), agg_factory.peer(mosquitto.url, "dev-b")
    g = a.global_model(1)
    n = g.weights.size
    forged = b.update(g, np.zeros(n, np.float32), 5)
    b.send(forged.encode(sign=keys["dev-a"][0].sign))
    assert "bad signature" in b.ack(forged.nonce).reason and not b.ack(forged.nonce).accepted
    ua = a.update(g, np.full(n, 0.01, np.float32), 10)
    a.send(ua.encode())  # unsigned: allowed
    assert a.ack(ua.nonce).accepted
    ub = b.update(g, np.full(n, 0.01, np.float32), 10)
    b.send(ub.encode(sign=keys["dev-b"][0].sign))
    assert b.ack(ub.nonce).accepted
    assert agg.wait() == 0, agg.text()[-3000:]
    assert "require_signatures=no" in agg.text() and agg.text().count("event=update_unverified") == 1
    assert ta.rounds_log(state)[0]["devices"] == ["dev-a", "dev-b"]


# ---------------------------------------------------------------------------------------


def device_with_keys(tmp: Path, url: str, bundle: Path, data: Path, device: str, key: Path | None, agg_pub: Path | None) -> Path:
    cfg = td.write_config(tmp, url, bundle, data, device_id=device)
    table = "".join(f'{k} = "{v}"\n' for k, v in (("key_file", key), ("aggregator_public_key", agg_pub)) if v)
    cfg.write_text(cfg.read_text() + "\n[signing]\n" + table)
    return cfg


def global_model(bundle: Path, run_id: str, rnd: int) -> GlobalModel:
    m = load_bundle(bundle)
    return GlobalModel(
        run_id, rnd, m.model_hash, td.initial_weights(bundle), total_rounds=5, deadline=time.time() + 60, config=RoundConfig()
    )


def test_device_rejects_unsigned_and_forged_global_models_and_accepts_the_real_one(
    mosquitto, tmp_path, boston_bundle, boston_shards
):
    shards, _ = boston_shards
    m = load_bundle(boston_bundle)
    dev_priv, dev_pub = signing.new_key_pair()
    agg_priv, agg_pub = signing.new_key_pair()
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(dev_priv)
    key_file.chmod(0o600)
    agg_pub_file = tmp_path / "aggregator-signing.pub"
    agg_pub_file.write_bytes(agg_pub)
    agg_key = signing.parse_private_key(agg_priv, "agg")
    dev_key = signing.parse_public_key(dev_pub, "dev")
    cfg = device_with_keys(tmp_path, mosquitto.url, boston_bundle, shards[0], "dev-0", key_file, agg_pub_file)
    peer = Peer(mosquitto.url, [td.T.all_updates, td.T.all_status])
    run_id = secrets.token_hex(16)
    log = tmp_path / "device.log"
    proc = td.start_device(cfg, log)
    state_file = tmp_path / "dev-0-state" / "device_state.json"
    try:
        # The real, signed round 1: trained, and the update is signed with the device's key.
        peer.publish(td.T.global_model, global_model(boston_bundle, run_id, 1).encode(sign=agg_key.sign), retain=True)
        _, payload = peer.wait_for(lambda t, p: t == td.T.update("dev-0"))
        u = Update.decode(payload, m.num_params)
        assert u.round == 1 and signing.verify(dev_key, u.signature, u.signed_part)
        peer.publish(td.T.ack("dev-0"), Ack(run_id, 1, "dev-0", u.nonce, True).encode())
        td.wait_log(log, "event=update_acknowledged")
        ta.wait_until(lambda: json.loads(state_file.read_text()).get("last_round") == 1)
        before = state_file.read_bytes()

        # Unsigned; signed by another key (a new run, which would reset the device's state);
        # signed and then altered; an unsigned bundle announcement.
        other = signing.parse_private_key(signing.new_key_pair()[0], "other")
        tampered = (
            global_model(boston_bundle, run_id, 2).encode(sign=agg_key.sign).replace(b'"total_rounds":5', b'"total_rounds":6')
        )
        announcement = BundleAnnouncement("cd" * 32, {"model_hash": "cd" * 32}, ("x",), 2048, 1024, 2).encode()
        for bad in (
            global_model(boston_bundle, run_id, 2).encode(),
            global_model(boston_bundle, secrets.token_hex(16), 1).encode(sign=other.sign),
            tampered,
        ):
            peer.publish(td.T.global_model, bad, retain=True)
        peer.publish(td.T.bundle, announcement, retain=True)
        deadline = time.monotonic() + 20
        while log.read_text().count("event=message_rejected") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        text = log.read_text()
        rejected = [line for line in text.splitlines() if "event=message_rejected" in line]
        assert len(rejected) == 4, text[-3000:]
        assert sum("global model signature does not verify" in line for line in rejected) == 3
        assert sum("bundle announcement signature does not verify" in line for line in rejected) == 1
        assert "Traceback" not in text and "event=bundle_fetch" not in text
        assert text.count("event=new_run") == 1, "only the real run 1 started a run"
        assert proc.poll() is None, "the device died"
        assert state_file.read_bytes() == before, "a rejected global model must leave the state untouched"
        assert all(t != td.T.update("dev-0") for t, _ in peer.drain()), "no update for a rejected global model"

        # The real round 2 is trained and answered with a signed update.
        peer.publish(td.T.global_model, global_model(boston_bundle, run_id, 2).encode(sign=agg_key.sign), retain=True)
        _, payload = peer.wait_for(lambda t, p: t == td.T.update("dev-0"))
        u2 = Update.decode(payload, m.num_params)
        assert u2.round == 2 and u2.run_id == run_id and signing.verify(dev_key, u2.signature, u2.signed_part)
    finally:
        stop_process(proc)
        peer.close()


def test_device_with_only_a_key_file_signs_and_takes_globals_unverified(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    m = load_bundle(boston_bundle)
    priv, pub = signing.new_key_pair()
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(priv)
    key_file.chmod(0o600)
    cfg = device_with_keys(tmp_path, mosquitto.url, boston_bundle, shards[1], "dev-1", key_file, None)
    peer = Peer(mosquitto.url, [td.T.all_updates])
    run_id = secrets.token_hex(16)
    peer.publish(td.T.global_model, global_model(boston_bundle, run_id, 1).encode(), retain=True)  # unsigned
    log = tmp_path / "device.log"
    proc = td.start_device(cfg, log, "--max-rounds", "1")
    try:
        _, payload = peer.wait_for(lambda t, p: t == td.T.update("dev-1"))
        u = Update.decode(payload, m.num_params)
        assert signing.verify(signing.parse_public_key(pub, "p"), u.signature, u.signed_part)
        peer.publish(td.T.ack("dev-1"), Ack(run_id, 1, "dev-1", u.nonce, True).encode())
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert text.count("verifies_globals=no") == 1 and "NOT verified" in text
        assert "event=signing_key_exposed" not in text
    finally:
        stop_process(proc)
        peer.close()


def test_a_bad_key_file_stops_the_device_with_exit_2(tmp_path, boston_bundle):
    bad = tmp_path / "signing.key"
    bad.write_text("not a key")
    cfg = device_with_keys(tmp_path, "mqtt://127.0.0.1:1", boston_bundle, tmp_path / "none.npz", "dev-2", bad, None)
    r = subprocess.run(
        [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "[signing] key_file" in r.stderr and "not a PEM private key" in r.stderr, r.stderr

"""Update signing without a broker: keys, signatures, the replay ledger, the aggregator's checks
(through the real validate_update and a real ModelStore), broker-config's key layout and what
flash picks out of it. The real-process tests are in tests/test_signing.py."""

from __future__ import annotations

import json
import os
import secrets
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator import signing as agg_signing
from fleetlearn.aggregator.model_store import ModelStore
from fleetlearn.aggregator.validation import Rejection, validate_update
from fleetlearn.cli import main as fleetlearn_main
from fleetlearn.edge_runtime.core import signing
from fleetlearn.edge_runtime.core.errors import ConfigError, UsageError
from fleetlearn.edge_runtime.core.protocol import HEADER_SIZE, BundleAnnouncement, GlobalModel, Topics, Update
from fleetlearn.edge_runtime.device.config import SigningConfig, parse_device_config
from tests.conftest import ROOT

T = Topics("signtest")
N = 6
MODEL = "ab" * 32


def keypair():
    priv, pub = signing.new_key_pair()
    return signing.parse_private_key(priv, "k"), signing.parse_public_key(pub, "p")


def write_pem(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# ---------------------------------------------------------------- keys and signatures


def test_key_files_round_trip_and_bad_keys_are_one_line_config_errors(tmp_path):
    priv, pub = signing.new_key_pair()
    assert priv.startswith(b"-----BEGIN PRIVATE KEY-----") and pub.startswith(b"-----BEGIN PUBLIC KEY-----")
    k = signing.load_private_key(write_pem(tmp_path / "k.pem", priv))
    p = signing.load_public_key(write_pem(tmp_path / "p.pem", pub, 0o644))
    assert signing.fingerprint(k) == signing.fingerprint(p)
    assert signing.verify(p, k.sign(b"x"), b"x") and not signing.verify(p, k.sign(b"x"), b"y")
    assert not signing.verify(p, k.sign(b"x")[:63], b"x") and not signing.verify(p, b"", b"x")

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "missing": (tmp_path / "nope.pem", "no such file"),
        "empty": (write_pem(tmp_path / "empty.pem", b""), "empty"),
        "garbage": (write_pem(tmp_path / "garbage.pem", b"hello"), "not a PEM private key"),
        "ec": (
            write_pem(
                tmp_path / "ec.pem",
                ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            ),
            "Ed25519 only",
        ),
        "encrypted": (
            write_pem(
                tmp_path / "enc.pem",
                k.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
                ),
            ),
            "encrypted",
        ),
        "public-as-private": (tmp_path / "p.pem", "not a PEM private key"),
    }
    for what, (path, needle) in cases.items():
        with pytest.raises(ConfigError, match=needle) as exc:
            signing.load_private_key(path, "[signing] key_file")
        assert "[signing] key_file" in str(exc.value) and "\n" not in str(exc.value), what
    ec_pub = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="Ed25519 only"):
        signing.load_public_key(write_pem(tmp_path / "ecpub.pem", ec_pub))
    with pytest.raises(ConfigError, match="not a PEM public key"):
        signing.load_public_key(tmp_path / "k.pem")


def test_device_signer_halves_and_global_model_verification(tmp_path):
    k, p = keypair()
    agg_k, agg_p = keypair()
    g = GlobalModel("1" * 32, 3, MODEL, np.arange(N, dtype=np.float32))
    unsigned = GlobalModel.decode(g.encode())
    good = GlobalModel.decode(g.encode(sign=agg_k.sign))
    forged = GlobalModel.decode(g.encode(sign=k.sign))
    raw = bytearray(g.encode(sign=agg_k.sign))
    raw[-1] ^= 1
    flipped = GlobalModel.decode(bytes(raw))

    full = signing.DeviceSigner(k, agg_p)
    assert (
        full.verify_global(good)
        and not full.verify_global(unsigned)
        and not full.verify_global(forged)
        and not full.verify_global(flipped)
    )
    assert full.sign is not None and signing.verify(p, full.sign(b"m"), b"m")
    # No aggregator key: nothing is verified (the agent logged that at start); no key_file: unsigned updates.
    key_only = signing.DeviceSigner(k, None)
    assert key_only.verify_global(unsigned) and key_only.verify_global(forged)
    verify_only = signing.DeviceSigner(None, agg_p)
    assert verify_only.sign is None
    u = Update("1" * 32, 3, "dev-0", MODEL, 5, 1.0, 0.1, secrets.token_hex(16), np.zeros(N, np.float32))
    assert Update.decode(u.encode(sign=verify_only.sign), N).signature == b""


def test_from_config_loads_keys_and_logs_what_is_not_verified(tmp_path, caplog):
    priv, pub = signing.new_key_pair()
    key = write_pem(tmp_path / "signing.key", priv, 0o644)  # too open: a warning, not an error
    with caplog.at_level("INFO", logger="fleetlearn.device"):
        s = signing.DeviceSigner.from_config(SigningConfig(key_file=str(key)), "dev-7")
    assert s.private_key is not None and s.aggregator_key is None
    text = caplog.text
    assert "event=signing_key_exposed device=dev-7" in text
    assert "event=signing device=dev-7 signs_updates=yes" in text and "verifies_globals=no" in text and "NOT verified" in text
    with pytest.raises(ConfigError, match="aggregator_public_key"):
        signing.DeviceSigner.from_config(SigningConfig(aggregator_public_key=str(tmp_path / "missing.pub")))
    # The config table is strict as ever.
    base = {"device_id": "d", "fleet": "f", "broker": "mqtt://h:1", "bundle": "b", "data": "x", "state_dir": "s"}
    with pytest.raises(ConfigError, match="unknown key 'signing.key'"):
        parse_device_config({**base, "signing": {"key": "x"}})


def test_bundle_announcement_signature_covers_every_field():
    k, p = keypair()
    a = BundleAnnouncement(
        MODEL,
        {"model_hash": MODEL, "mean": [0.1, 1e-7, 3.0], "files": {"m.onnx": {"sha256": "c" * 64, "size": 2000}}},
        ("m.onnx",),
        2000,
        1024,
        2,
    )
    signed = signing.sign_announcement(k, a.encode())
    assert signing.verify_announcement(p, signed)
    assert BundleAnnouncement.decode(signed) == a, "the signature field must not disturb decoding"
    assert not signing.verify_announcement(p, a.encode()), "unsigned"
    assert not signing.verify_announcement(keypair()[1], signed), "another key"
    for old, new in ((b'"c', b'"d'), (b"2000,", b"2001,"), (b"1e-07", b"2e-07")):
        assert old in signed
        assert not signing.verify_announcement(p, signed.replace(old, new, 1)), old
    doc = json.loads(signed)
    doc["extra"] = 1
    assert not signing.verify_announcement(p, json.dumps(doc).encode()), "an added field"
    # Key order and whitespace do not matter (canonical JSON), the content does.
    reordered = json.dumps(dict(reversed(list(json.loads(signed).items()))), indent=1).encode()
    assert signing.verify_announcement(p, reordered)
    for junk in (b"", b"[]", b"\xff", b'{"signature": 5}', b'{"signature":"' + b"0" * 128 + b'"}', b"NaN"):
        assert not signing.verify_announcement(p, junk)
    assert signing.DeviceSigner(None, None).verify_announcement(a.encode())


# ---------------------------------------------------------------- the replay ledger


def ledger_lines(path) -> int:
    return len(path.read_text().splitlines())


def test_ledger_rules_persistence_and_bounds(tmp_path):
    path = tmp_path / "seen.jsonl"
    run = "7" * 32
    led = agg_signing.NonceLedger(path, run, open_round=1, keep_rounds=3, per_device=5)
    n1 = secrets.token_hex(16)
    assert led.check("a", n1, 1, "d1" * 16, 1) is None  # first sight: recorded
    assert led.check("a", n1, 1, "d1" * 16, 1) is None  # identical re-send
    assert "already used for a different update in round 1" in led.check("a", n1, 1, "d2" * 16, 1)
    assert "already used in round 1" in led.check("a", n1, 2, "d1" * 16, 2)
    assert led.check("b", n1, 1, "d1" * 16, 1) is None, "nonces are per device"
    # Persisted once flushed (the aggregator flushes before any verdict leaves: intake.py): a
    # restart (a new ledger on the same file) remembers; a torn last line is skipped.
    assert ledger_lines(path) == 1, "entries are buffered until flush()"
    led.flush()
    assert ledger_lines(path) == 3
    with open(path, "a") as f:
        f.write('["a", "trunc')
    again = agg_signing.NonceLedger(path, run, open_round=2, keep_rounds=3, per_device=5)
    assert "already used in round 1" in again.check("a", n1, 2, "d1" * 16, 2)
    # Another run's ledger is not this run's.
    other = agg_signing.NonceLedger(path, "8" * 32, open_round=2, keep_rounds=3, per_device=5)
    assert other.check("a", n1, 2, "d1" * 16, 2) is None
    # Bounded: rounds older than keep_rounds are forgotten at the next round's compaction...
    led = agg_signing.NonceLedger(tmp_path / "b.jsonl", run, open_round=1, keep_rounds=3, per_device=5)
    old = secrets.token_hex(16)
    led.check("a", old, 1, "e" * 32, 1)
    for rnd in range(2, 6):
        led.check("a", secrets.token_hex(16), rnd, "f" * 32, rnd)
    assert old not in led.entries("a") and len(led.entries("a")) == 3
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["run_id"] == run and len(lines) <= 1 + 3 + 1
    # ...and one device cannot hold more than per_device entries.
    for _ in range(20):
        led.check("flood", secrets.token_hex(16), 5, "0" * 32, 5)
    assert len(led.entries("flood")) == 5


# ---------------------------------------------------------------- the aggregator's checks


@pytest.fixture
def store(tmp_path):
    return ModelStore.open(tmp_path / "state", MODEL, N, lambda: np.zeros(N, np.float32))


def make_update(store, device, rnd=None, nonce=None, samples=5, **kw) -> Update:
    return Update(
        store.run_id,
        rnd or store.open_round,
        device,
        MODEL,
        samples,
        1.0,
        0.1,
        nonce or secrets.token_hex(16),
        np.full(N, 0.01, np.float32),
        **kw,
    )


def check(store, auth, device, payload, accepted=None, previous=None):
    return validate_update(
        T.update(device),
        payload,
        topics=T,
        num_params=N,
        version=store,
        accepted=accepted or {},
        previous_accepted=previous or {},
        authenticate=auth.authenticate,
    )


def test_authenticate_signature_rules_in_require_and_allow_modes(tmp_path, store, caplog):
    keys = {d: keypair() for d in ("dev-a", "dev-b")}
    src = tmp_path / "pubs"
    src.mkdir()
    for d, (_, p) in keys.items():
        (src / f"{d}.pub").write_bytes(signing.public_pem(p))
    auth = agg_signing.open_signing(store.state_dir, store.run_id, store.open_round, device_keys=src)
    assert auth.require and set(auth.device_keys) == {"dev-a", "dev-b"} and auth.sign is not None
    own = store.state_dir / agg_signing.AGGREGATOR_KEY
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert (
        signing.load_public_key(store.state_dir / agg_signing.AGGREGATOR_PUB).public_bytes_raw()
        == auth.private_key.public_key().public_bytes_raw()
    )

    ka, kb = keys["dev-a"][0], keys["dev-b"][0]
    u = make_update(store, "dev-a")
    assert check(store, auth, "dev-a", u.encode(sign=ka.sign)).update.nonce == u.nonce

    def reason(device, payload):
        with pytest.raises(Rejection) as exc:
            check(store, auth, device, payload)
        assert exc.value.device == device
        return exc.value.reason

    assert "unsigned update" in reason("dev-a", make_update(store, "dev-a").encode())
    assert "does not verify with device dev-a's registered key" in reason(
        "dev-a", make_update(store, "dev-a").encode(sign=kb.sign)
    )
    raw = bytearray(make_update(store, "dev-a").encode(sign=ka.sign))
    raw[-5] ^= 0x40
    assert "bad signature" in reason("dev-a", bytes(raw))
    tampered = (
        make_update(store, "dev-a", samples=10).encode(sign=ka.sign, packed=False).replace(b'"samples":10', b'"samples":99')
    )
    assert "bad signature" in reason("dev-a", tampered)
    # the packed meta is signed as well: samples (u32 at meta offset 52) 10 -> 99
    packed = make_update(store, "dev-a", samples=10).encode(sign=ka.sign)
    at = HEADER_SIZE + 52
    assert packed[at : at + 4] == struct.pack("<I", 10)
    assert "bad signature" in reason("dev-a", packed[:at] + struct.pack("<I", 99) + packed[at + 4 :])
    stranger = keypair()[0]
    assert "no signing key is registered for device dev-x" in reason(
        "dev-x", make_update(store, "dev-x").encode(sign=stranger.sign)
    )
    assert "no signing key is registered for device dev-x" in reason("dev-x", make_update(store, "dev-x").encode())

    # --allow-unsigned: unsigned and unknown-device updates pass (logged once per device);
    # a signature from a registered device is still checked.
    allow = agg_signing.open_signing(store.state_dir, store.run_id, store.open_round, require=False)
    with caplog.at_level("WARNING", logger="fleetlearn.aggregator"):
        for _ in range(2):
            check(store, allow, "dev-a", make_update(store, "dev-a").encode())
        check(store, allow, "dev-x", make_update(store, "dev-x").encode(sign=stranger.sign))
    assert (
        caplog.text.count("event=update_unverified device=dev-a") == 1 and "event=update_unverified device=dev-x" in caplog.text
    )
    with pytest.raises(Rejection, match="bad signature"):
        check(store, allow, "dev-b", make_update(store, "dev-b").encode(sign=ka.sign))


def test_unverified_devices_are_logged_one_by_one_then_as_their_count_doubles(store, caplog):
    """An unsigned fleet of 40 devices: the first 10 by name, then at 16 and 32 (each accepted)."""
    auth = agg_signing.open_signing(store.state_dir, store.run_id, store.open_round)  # no keys: unsigned fleet
    with caplog.at_level("WARNING", logger="fleetlearn.aggregator"):
        for i in range(40):
            device = f"dev-{i:02d}"
            assert not check(store, auth, device, make_update(store, device).encode()).duplicate
    lines = [r.getMessage() for r in caplog.records if "event=update_unverified" in r.getMessage()]
    assert [line.split("device=")[1].split()[0] for line in lines] == [f"dev-{i:02d}" for i in (*range(10), 15, 31)]
    assert "unverified_devices=32" in lines[-1]


def test_replay_rules_through_validate_update(store):
    auth = agg_signing.open_signing(store.state_dir, store.run_id, store.open_round)  # no keys: unsigned fleet
    assert not auth.require and auth.sign is None
    u1 = make_update(store, "dev-a")
    p1 = u1.encode()
    assert not check(store, auth, "dev-a", p1).duplicate
    # Same bytes in the same round: the idempotent re-send (a lost ack), acked as a duplicate.
    assert check(store, auth, "dev-a", p1, accepted={"dev-a": u1.nonce}).duplicate
    # Same nonce, other content, same round: a replay, not a "duplicate update".
    with pytest.raises(Rejection, match="already used for a different update in round 1"):
        check(
            store, auth, "dev-a", make_update(store, "dev-a", nonce=u1.nonce, samples=77).encode(), accepted={"dev-a": u1.nonce}
        )
    store.commit(1, np.zeros(N, np.float32), {"round": 1}, {"dev-a": u1.nonce})
    # Round 2: the round-1 update re-sent as is is still the counted one ("counted before it closed")...
    v = check(store, auth, "dev-a", p1, previous=store.last_accepted)
    assert v.duplicate and "counted before it closed" in v.note
    # ...a new round-2 update that reuses the nonce is a replay...
    with pytest.raises(Rejection, match="replay: nonce .* already used in round 1"):
        check(store, auth, "dev-a", make_update(store, "dev-a", nonce=u1.nonce).encode(), previous=store.last_accepted)
    store.commit(2, np.zeros(N, np.float32), {"round": 2}, {})
    # ...and two rounds on, the captured round-1 update is late, as before.
    with pytest.raises(Rejection, match="round 1 closed"):
        check(store, auth, "dev-a", p1, previous=store.last_accepted)
    # Updates of another run never enter the ledger (they fail the version check).
    other = Update("9" * 32, 3, "dev-a", MODEL, 5, 1.0, 0.1, u1.nonce, np.zeros(N, np.float32))
    with pytest.raises(Rejection, match="not the current run"):
        check(store, auth, "dev-a", other.encode())


def test_open_signing_modes_and_key_import(tmp_path, store):
    sd = store.state_dir
    # No keys anywhere: nothing made, nothing required.
    auth = agg_signing.open_signing(sd, store.run_id, 1)
    assert auth.private_key is None and not (sd / agg_signing.AGGREGATOR_KEY).exists()
    with pytest.raises(UsageError, match="--require-signatures: no device keys"):
        agg_signing.open_signing(sd, store.run_id, 1, require=True)
    # --signing-key FILE is used as given; its public half lands in the state dir.
    priv, _ = signing.new_key_pair()
    given = write_pem(tmp_path / "agg.key", priv)
    auth = agg_signing.open_signing(sd, store.run_id, 1, signing_key=given)
    assert signing.private_pem(auth.private_key) == priv and not auth.require
    assert (sd / agg_signing.AGGREGATOR_PUB).exists() and not (sd / agg_signing.AGGREGATOR_KEY).exists()
    # Import: checked first, then copied; a changed key is a rotation; bad input writes nothing.
    src = tmp_path / "src"
    src.mkdir()
    _, p1 = keypair()
    (src / "dev-0.pub").write_bytes(signing.public_pem(p1))
    (src / "README").write_text("ignored: not a .pub")
    assert agg_signing.import_device_keys(src, sd) == [("dev-0", "added")]
    assert agg_signing.import_device_keys(src, sd) == [("dev-0", "unchanged")]
    _, p2 = keypair()
    (src / "dev-0.pub").write_bytes(signing.public_pem(p2))
    assert agg_signing.import_device_keys(src, sd) == [("dev-0", "replaced")]
    assert agg_signing.read_device_keys(sd / "device-keys")["dev-0"].public_bytes_raw() == p2.public_bytes_raw()
    for name, data, needle in (
        ("bad id!.pub", signing.public_pem(p1), "not a device id"),
        ("dev-1.pub", b"junk", "not a PEM public key"),
        ("dev-2.pub", priv, "not a PEM public key"),
    ):
        bad = tmp_path / f"bad-{secrets.token_hex(2)}"
        bad.mkdir()
        (bad / name).write_bytes(data)
        (bad / "dev-9.pub").write_bytes(signing.public_pem(p1))
        with pytest.raises(UsageError, match=needle):
            agg_signing.import_device_keys(bad, sd)
        assert not (sd / "device-keys" / "dev-9.pub").exists()
    with pytest.raises(UsageError, match="no <device_id>.pub files"):
        agg_signing.import_device_keys(tmp_path / "state" / "global", sd)
    # Device keys registered: required by default, an own key is made once and then reused.
    auth = agg_signing.open_signing(sd, store.run_id, 1)
    assert auth.require and auth.private_key is not None
    made = (sd / agg_signing.AGGREGATOR_KEY).read_bytes()
    assert signing.private_pem(agg_signing.open_signing(sd, store.run_id, 1).private_key) == made
    assert not agg_signing.open_signing(sd, store.run_id, 1, require=False).require


# ---------------------------------------------------------------- key making: broker-config and flash


def test_broker_config_signing_keys_layout_matches_what_flash_and_the_aggregator_read(tmp_path, store):
    out = tmp_path / "fleet"
    assert (
        fleetlearn_main(
            [
                "broker-config",
                "--fleet",
                "f",
                "--devices",
                "dev-0,dev-1",
                "--out",
                str(out),
                "--max-model-params",
                "100",
                "--signing-keys",
            ]
        )
        == 0
    )
    mode = lambda p: stat.S_IMODE((out / p).stat().st_mode)
    for d in ("dev-0", "dev-1"):
        assert mode(f"devices/{d}/signing.key") == 0o600 and mode(f"devices/{d}/signing.pub") == 0o644
        k = signing.load_private_key(out / "devices" / d / "signing.key")
        assert (
            signing.public_pem(k.public_key())
            == (out / "devices" / d / "signing.pub").read_bytes()
            == (out / "aggregator" / "device-keys" / f"{d}.pub").read_bytes()
        )
    assert mode("aggregator/signing.key") == 0o600 and mode("aggregator/device-keys") == 0o700
    agg_key = signing.load_private_key(out / "aggregator" / "signing.key")
    assert signing.public_pem(agg_key.public_key()) == (out / "aggregator" / "signing.pub").read_bytes()
    fps = {signing.fingerprint(signing.load_public_key(p)) for p in out.rglob("*.pub")}
    assert len(fps) == 3, "every key pair is its own"
    assert "--device-keys aggregator/device-keys" in (out / "README.md").read_text()

    # flash --credentials picks exactly this device's key and the aggregator's public key...
    from fleetlearn.provisioning import credentials, pki

    s = credentials.device_secrets(out, "dev-0", fresh_signing_key=False)
    assert s.files[credentials.SIGNING_KEY] == (out / "devices" / "dev-0" / "signing.key").read_bytes()
    assert s.files[credentials.AGGREGATOR_PUB] == (out / "aggregator" / "signing.pub").read_bytes()
    assert (out / "devices" / "dev-1" / "signing.key").read_bytes() not in b"".join(s.files.values())
    # ...and refuses to make a second key for a device that has one.
    from fleetlearn.provisioning.errors import CredentialsError

    with pytest.raises(CredentialsError, match="already exists"):
        credentials.device_secrets(out, "dev-0", fresh_signing_key=True)
    # flash --new-signing-key's key pair (the one generator, shared with broker-config and the
    # aggregator) has the format the device and the aggregator read.
    assert credentials.new_signing_key_pair is pki.new_signing_key_pair
    priv, pub = pki.new_signing_key_pair()
    assert signing.fingerprint(signing.parse_private_key(priv, "k")) == signing.fingerprint(signing.parse_public_key(pub, "p"))
    # The aggregator imports broker-config's device-keys directory as it is.
    assert sorted(agg_signing.import_device_keys(out / "aggregator" / "device-keys", store.state_dir)) == [
        ("dev-0", "added"),
        ("dev-1", "added"),
    ]
    # Without --signing-keys: no key files at all.
    plain = tmp_path / "plain"
    assert (
        fleetlearn_main(["broker-config", "--fleet", "f", "--devices", "dev-0", "--out", str(plain), "--max-model-params", "100"])
        == 0
    )
    assert not list(plain.rglob("signing.*")) and not (plain / "aggregator" / "device-keys").exists()


def test_a_keyless_device_never_imports_cryptography(tmp_path):
    probe = (
        "import sys\n"
        "from fleetlearn.edge_runtime.device.wiring import load_signer\n"
        "from fleetlearn.edge_runtime.device.config import parse_device_config\n"
        "cfg = parse_device_config({'device_id': 'd', 'fleet': 'f', 'broker': 'mqtt://h:1', 'bundle': 'b', 'data': 'x', 'state_dir': 's'})\n"
        "assert load_signer(cfg) is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'torch')))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout

"""`fleetlearn broker-config` against a real mosquitto started from the files it writes.

Every test generates a fleet directory, starts Debian's mosquitto with DIR/mosquitto.conf on a
free loopback port, and talks to it with real paho clients (and real aggregator and device
processes for the full round). Nothing is mocked. What mosquitto 2.0.11 did is asserted
as observed, so an upgrade that changes it fails here first (docs/security-broker.md).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import secrets
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleetlearn.cli import main as fleetlearn_main
from fleetlearn.edge_runtime.core import protocol
from fleetlearn.edge_runtime.core.protocol import Topics, Update
from fleetlearn.provisioning import limits as bc
from fleetlearn.provisioning.passwords import hash_password
from fleetlearn.provisioning.pki import make_tls_files
from tests.conftest import ROOT, free_port, mosquitto_binary, stop_process, wait_port

pytestmark = pytest.mark.mosquitto

FLEET = "sec"
T = Topics(FLEET)
DEVICES = ("dev-0", "dev-1")
NOT_AUTHORIZED = 0x87
PARAMS = 1000  # --max-model-params for the tests that need no real bundle


# ---------------------------------------------------------------- generating and running


def generate(out: Path, port: int, *extra: str, devices: tuple[str, ...] = DEVICES) -> Path:
    args = [
        "broker-config",
        "--fleet",
        FLEET,
        "--devices",
        ",".join(devices),
        "--out",
        str(out),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--monitor",
        *extra,
    ]
    if "--service-port" not in extra:
        args += ["--service-port", str(free_port())]
    if not any(a in extra for a in ("--bundle", "--max-model-params")):
        args += ["--max-model-params", str(PARAMS)]
    if os.geteuid() == 0:
        # As root mosquitto drops to the `mosquitto` user before reading the password file; that
        # user cannot enter pytest's private tmp dirs. Production runs it as `mosquitto` (README).
        args += ["--run-as", "root"]
    assert fleetlearn_main(args) == 0
    return out


def conf_value(fleet_dir: Path, key: str) -> int:
    match = re.search(rf"^{key} (\d+)$", (fleet_dir / "mosquitto.conf").read_text(), re.M)
    assert match, f"{key} missing from mosquitto.conf"
    return int(match.group(1))


def password(fleet_dir: Path, user: str) -> str:
    role = {"aggregator": "aggregator", "monitor": "monitor"}.get(user, f"devices/{user}")
    return (fleet_dir / role / "mqtt-password").read_text().strip()


@dataclass
class RunningBroker:
    dir: Path
    port: int
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_broker(fleet_dir: Path, port: int) -> RunningBroker:
    log = fleet_dir.parent / f"mosquitto-{port}.log"
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(fleet_dir / "mosquitto.conf")], stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )
    try:
        wait_port(port)
    except TimeoutError:
        stop_process(proc)
        raise AssertionError(f"mosquitto did not start from the generated conf:\n{log.read_text()}") from None
    return RunningBroker(fleet_dir, port, proc, log)


@pytest.fixture
def plain(tmp_path):
    port = free_port()
    broker = start_broker(generate(tmp_path / "fleet", port), port)
    yield broker
    stop_process(broker.proc)


@pytest.fixture
def tls(tmp_path):
    port = free_port()
    broker = start_broker(generate(tmp_path / "fleet", port, "--tls", "--host", "localhost"), port)
    yield broker
    stop_process(broker.proc)


# ---------------------------------------------------------------- a recording MQTT client


@dataclass
class Client:
    """A paho client that records what the broker said: CONNACK, PUBACK reason codes,
    SUBACK codes, messages and disconnects. Nothing is retried behind the test's back."""

    port: int
    user: str | None
    password: str | None
    protocol: str = "3.1.1"
    ca_file: Path | None = None
    host: str = "127.0.0.1"
    clean_session: bool = True  # MQTT 3.1.1 only
    client_id: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")
    connack: queue.Queue[ReasonCode] = field(default_factory=queue.Queue)
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    disconnects: list[str] = field(default_factory=list)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # paho's own log, debug included

    def __post_init__(self) -> None:
        v5 = self.protocol == "5"
        self.lock = threading.Condition()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else self.clean_session,
        )
        if self.user is not None:
            self.c.username_pw_set(self.user, self.password)
        if self.ca_file is not None:
            self.c.tls_set(ca_certs=str(self.ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = lambda c, u, f, rc, p=None: self.connack.put(rc)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.c.on_disconnect = self._on_disconnect
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = self._on_subscribe
        self.c.on_log = lambda c, u, level, text: self.log.append(text)

    def _on_disconnect(self, client, userdata, flags, rc, properties=None) -> None:
        with self.lock:
            self.disconnects.append(str(rc))
            self.lock.notify_all()

    def _on_publish(self, client, userdata, mid, rc, properties=None) -> None:
        with self.lock:
            self.pubacks[mid] = rc
            self.lock.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, properties=None) -> None:
        with self.lock:
            self.subacks[mid] = list(rcs)
            self.lock.notify_all()

    def connect(self, timeout: float = 10.0) -> ReasonCode | None:
        """The CONNACK's reason code, or None when the broker closed the connection without one."""
        self.c.connect(self.host, self.port, keepalive=30)
        self.c.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            return None

    def connected(self) -> Client:
        rc = self.connect()
        assert rc is not None and not rc.is_failure, f"{self.user}: {rc}"
        return self

    def _wait(self, what: dict, key: int, timeout: float):
        end = time.monotonic() + timeout
        with self.lock:
            while key not in what:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)
            return what[key]

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[ReasonCode]:
        _, mid = self.c.subscribe(topic, qos=1)
        codes = self._wait(self.subacks, mid, timeout)
        assert codes is not None, f"no SUBACK for {topic}"
        return codes

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        return self.c.publish(topic, payload, qos=qos).mid

    def puback(self, mid: int, timeout: float = 10.0) -> ReasonCode | None:
        return self._wait(self.pubacks, mid, timeout)

    def wait_for(self, topic: str, timeout: float = 15.0) -> tuple[list[tuple[str, bytes]], bytes]:
        """(every message seen before it, the payload of the first message on `topic`)."""
        seen: list[tuple[str, bytes]] = []
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.user}: nothing on {topic} in {timeout}s; saw {[t for t, _ in seen]}")
            try:
                t, p = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if t == topic:
                return seen, p
            seen.append((t, p))

    def drain(self, settle: float = 0.5) -> list[tuple[str, bytes]]:
        time.sleep(settle)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def client(broker: RunningBroker, user: str, **kw) -> Client:
    return Client(broker.port, user, password(broker.dir, user), **kw)


# ---------------------------------------------------------------- the files written


def test_files_modes_and_formats(tmp_path):
    out = generate(tmp_path / "fleet", 18830, "--tls", "--host", "broker.example.com,10.1.2.3")
    mode = lambda p: stat.S_IMODE((out / p).stat().st_mode)
    for secret in (
        "passwd",
        "acl",
        "ca.key",
        "server.key",
        "aggregator/mqtt-password",
        "monitor/mqtt-password",
        "devices/dev-0/mqtt-password",
    ):
        assert mode(secret) == 0o600, secret
    for private_dir in ("", "devices", "devices/dev-0", "data"):
        assert mode(private_dir) == 0o700, private_dir
    assert mode("ca.crt") == 0o644
    # One $7$ line per user, in mosquitto_passwd 2.0's exact layout, and the hash matches the
    # plaintext written for that user.
    lines = (out / "passwd").read_text().splitlines()
    users = [line.split(":", 1)[0] for line in lines]
    assert users == ["aggregator", "monitor", "dev-0", "dev-1"]
    for line in lines:
        user, hashed = line.split(":", 1)
        m = re.fullmatch(r"\$7\$101\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)", hashed)
        assert m, line
        assert hash_password(password(out, user), salt=base64.b64decode(m.group(1))) == hashed
    assert len({password(out, u) for u in users}) == 4
    # Every conf path is absolute and points into --out.
    conf = (out / "mosquitto.conf").read_text()
    for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile", "persistence_location"):
        values = re.findall(rf"^{key} (.+)$", conf, re.M)  # TLS settings: once per listener
        assert values and all(v.startswith(str(out) + "/") for v in values), (key, values)
    # The server certificate names every --host and 127.0.0.1, and the CA is a CA.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    assert "never copy it to a broker or a device" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".fleet.*")), "temporary directory left behind"


def test_frame_sizes_agree_with_the_protocol_and_limits_fit_a_real_bundle(boston_bundle, tmp_path):
    # The limits use the protocol's own bounds (imported, never copied): the frame layout of
    # docs/protocol.md, 24-byte header + meta bound + body + signature bound.
    assert (
        bc.model_frame_bytes(1000)
        == protocol.HEADER_SIZE + protocol.MAX_META_BYTES + protocol.max_body_bytes(1000) + protocol.MAX_SIG_BYTES
        == 24 + 8192 + (4000 + 16) + 512
    )
    assert bc.chunk_frame_bytes(4096) == protocol.HEADER_SIZE + protocol.MAX_META_BYTES + 4096
    assert bc.MAX_JSON_BYTES is protocol.MAX_JSON_BYTES and bc.MAX_MODEL_PARAMS is protocol.MAX_MODEL_PARAMS
    size = bc.size_from_bundle(boston_bundle, protocol.DEFAULT_CHUNK_SIZE)
    limits = bc.compute_limits(size, 2)
    assert size.measured and size.num_params > 0
    assert (
        limits.message_size_limit >= bc.chunk_frame_bytes(protocol.DEFAULT_CHUNK_SIZE)
        and limits.message_size_limit >= size.announcement_bytes
    )
    # A model of 1M parameters: a 4 MB frame passes, the per-client queue holds the largest burst.
    big = bc.compute_limits(bc.size_from_params(1_000_000, protocol.DEFAULT_CHUNK_SIZE), 50)
    assert big.message_size_limit >= bc.model_frame_bytes(1_000_000)
    assert big.max_queued_bytes >= 50 * bc.model_frame_bytes(1_000_000)
    assert big.max_packet_size > big.message_size_limit


@pytest.mark.parametrize(
    "devices, extra, needle",
    [
        ("dev-0,dev/1", (), "'dev/1' is not allowed"),
        ("dev-0,dev+", (), "'dev+' is not allowed"),
        ("dev-0,#", (), "'#' is not allowed"),
        ("dev-0,dev-0", (), "listed twice"),
        ("dev-0,aggregator", (), "name of a service user"),
        ("dev-0,monitor", (), "name of a service user"),
        ("dev-0,boss", ("--aggregator-user", "boss"), "name of a service user"),
        ("", (), "at least one device"),
        ("dev-0", ("--fleet", "a/b"), "fleet name 'a/b' is not allowed"),
        ("dev-0", ("--host", "bad host"), "neither a DNS name nor an IP"),
        ("dev-0", ("--port", "70000"), "not a TCP port"),
        ("dev-0", ("--max-model-params", "0"), "between 1 and"),
        ("dev-0", ("--chunk-size", "10"), "--chunk-size 10"),
        ("dev-0", ("--broker-dir", "/etc/b\nallow_anonymous true"), "contains a control character"),
        ("dev-0", ("--bind", "0.0.0.0 extra"), "neither an IP address"),
        ("dev-0", ("--aggregator-user", "monitor"), "the monitor's user name"),
        ("dev-0", ("--bundle", "/nonexistent/bundle"), "not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, devices, extra, needle):
    args = ["broker-config", "--fleet", FLEET, "--devices", devices, "--out", str(tmp_path / "out")]
    if "--max-model-params" not in extra and "--bundle" not in extra:
        args += ["--max-model-params", "100"]
    args += list(extra)  # a second --fleet overrides the first (argparse keeps the last)
    assert fleetlearn_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fleetlearn broker-config: error:") and needle in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_existing_out_needs_force_and_force_replaces_everything(tmp_path, capsys):
    out = generate(tmp_path / "fleet", 18830)
    before = password(out, "dev-0")
    args = ["broker-config", "--fleet", FLEET, "--devices", "dev-0", "--out", str(out), "--max-model-params", "10"]
    assert fleetlearn_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --force" in err
    assert password(out, "dev-0") == before  # untouched
    assert fleetlearn_main(args + ["--force"]) == 0
    assert password(out, "dev-0") != before
    assert not (out / "devices" / "dev-1").exists(), "--force must replace the directory, not merge into it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet"], "temporary or old directories left behind"


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("proto", ["3.1.1", "5"])
def test_wrong_password_is_refused_and_the_right_one_connects(plain, proto):
    for user, pw in (("dev-0", "not-the-password"), ("dev-0", password(plain.dir, "dev-1")), ("nobody", "x"), (None, None)):
        c = Client(plain.port, user, pw, protocol=proto)
        rc = c.connect()
        c.close()
        assert rc is not None and rc.is_failure and str(rc) == "Not authorized", (user, rc)
    ok = client(plain, "dev-0", protocol=proto)
    rc = ok.connect()
    ok.close()
    assert rc is not None and not rc.is_failure


def test_a_device_cannot_take_over_another_devices_session_by_client_id(plain):
    victim = client(plain, "dev-1", client_id=f"fleetlearn-{FLEET}-dev-1").connected()
    victim.subscribe(T.ack("dev-1"))
    thief = client(plain, "dev-0", client_id=f"fleetlearn-{FLEET}-dev-1").connected()
    agg = client(plain, "aggregator").connected()
    try:
        agg.publish(T.ack("dev-1"), b"still yours")
        _, payload = victim.wait_for(T.ack("dev-1"))
        assert payload == b"still yours" and victim.disconnects == [], "use_username_as_clientid should keep dev-1 connected"
    finally:
        for c in (victim, thief, agg):
            c.close()


# ---------------------------------------------------------------- ACL


def test_device_publishes_only_its_own_topics_mqtt311_acks_and_drops(plain):
    """Over MQTT 3.1.1 a publish the ACL denies is acknowledged (PUBACK, no reason code exists in
    3.1.1) and silently dropped: the device cannot tell."""
    observer = client(plain, "aggregator").connected()
    monitor = client(plain, "monitor").connected()
    observer.subscribe(f"{T.base}/#")
    monitor.subscribe(f"{T.base}/#")
    dev = client(plain, "dev-0").connected()
    try:
        forbidden = [
            T.update("dev-1"),
            T.global_model,
            T.round,
            T.bundle,
            T.bundle_chunk("0" * 64, 0),
            T.ack("dev-0"),
            T.status("dev-1"),
            f"{T.base}/other",
        ]
        mids = [dev.publish(t, b"forged") for t in forbidden]
        own = dev.publish(T.update("dev-0"), b"mine")
        for mid in mids + [own]:
            rc = dev.puback(mid)
            assert rc is not None and not rc.is_failure, rc
        before, payload = observer.wait_for(T.update("dev-0"))
        assert payload == b"mine" and before == [] and observer.drain() == []
        before, _ = monitor.wait_for(T.update("dev-0"))
        assert before == [] and monitor.drain() == []
        assert dev.disconnects == []
    finally:
        for c in (observer, monitor, dev):
            c.close()


def test_device_publishes_only_its_own_topics_mqtt5_reports_not_authorized(plain):
    """Over MQTT 5 mosquitto 2.0 answers a denied QoS 1 publish with PUBACK reason code 0x87
    "Not authorized"; the connection stays up and allowed publishes still pass."""
    observer = client(plain, "aggregator").connected()
    observer.subscribe(f"{T.base}/#")
    dev = client(plain, "dev-0", protocol="5").connected()
    try:
        bad = dev.publish(T.update("dev-1"), b"forged")
        bad_global = dev.publish(T.global_model, b"forged")
        own = dev.publish(T.update("dev-0"), b"mine")
        for mid in (bad, bad_global):
            rc = dev.puback(mid)
            assert rc is not None and rc.is_failure and rc.value == NOT_AUTHORIZED and str(rc) == "Not authorized", rc
        rc = dev.puback(own)
        # 0x00, or 0x10 "No matching subscribers" when nobody listens: both are successes.
        assert rc is not None and not rc.is_failure, rc
        before, payload = observer.wait_for(T.update("dev-0"))
        assert payload == b"mine" and before == [] and observer.drain() == []
        assert dev.disconnects == []
    finally:
        observer.close()
        dev.close()


@pytest.mark.parametrize("proto", ["3.1.1", "5"])
def test_device_cannot_read_another_devices_ack(plain, proto):
    """The subscription itself is granted (mosquitto 2.0's ACL file checks reads per message at
    delivery), but nothing from a topic the device may not read is ever delivered."""
    nosy = client(plain, "dev-1", protocol=proto).connected()
    owner = client(plain, "dev-0").connected()
    agg = client(plain, "aggregator").connected()
    try:
        codes = nosy.subscribe(T.ack("dev-0")) + nosy.subscribe(f"{T.base}/#")
        assert all(not rc.is_failure for rc in codes), codes
        owner.subscribe(T.ack("dev-0"))
        agg.publish(T.ack("dev-0"), b"for dev-0 only")
        agg.publish(T.ack("dev-1"), b"for dev-1")
        _, payload = owner.wait_for(T.ack("dev-0"))
        assert payload == b"for dev-0 only"
        before, payload = nosy.wait_for(T.ack("dev-1"))
        assert payload == b"for dev-1" and before == [] and nosy.drain() == []
    finally:
        for c in (nosy, owner, agg):
            c.close()


def test_a_last_will_on_a_forbidden_topic_is_never_delivered(plain):
    """A device could try to publish a global model through its Last Will: mosquitto accepts the
    CONNECT but checks the ACL when the will fires, and drops it."""
    observer = client(plain, "aggregator").connected()
    observer.subscribe(f"{T.base}/#")

    def die_with_will(topic: str, payload: bytes) -> None:
        dev = client(plain, "dev-0")
        dev.c.will_set(topic, payload, qos=1)
        dev.connected()
        dev.c.loop_stop()
        dev.c.socket().close()  # no DISCONNECT packet: the broker publishes the will

    try:
        die_with_will(T.global_model, b"evil")
        die_with_will(T.status("dev-0"), b"offline")
        before, payload = observer.wait_for(T.status("dev-0"))
        assert payload == b"offline" and before == [] and observer.drain() == []
    finally:
        observer.close()


# ---------------------------------------------------------------- TLS


def test_tls_listener_refuses_plain_tcp_and_a_wrong_ca(tls, tmp_path):
    ca = tls.dir / "ca.crt"
    # Plain MQTT to the TLS port: the broker reads a CONNECT as a bad TLS handshake and closes.
    plain_client = client(tls, "dev-0")
    assert plain_client.connect(timeout=3) is None
    plain_client.close()
    # A CA that did not sign this broker's certificate: the handshake fails before any MQTT.
    other = make_tls_files("other", ("localhost",))
    wrong_ca = tmp_path / "other-ca.crt"
    wrong_ca.write_bytes(other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        client(tls, "dev-0", ca_file=wrong_ca, host="localhost").connect()
    # The fleet's CA, by the certificate's DNS name and by its 127.0.0.1 IP entry.
    for host in ("localhost", "127.0.0.1"):
        good = client(tls, "dev-0", ca_file=ca, host=host, protocol="5")
        rc = good.connect()
        good.close()
        assert rc is not None and not rc.is_failure, (host, rc)
    # TLS does not replace the password.
    bad = Client(tls.port, "dev-0", "wrong", ca_file=ca, host="localhost")
    rc = bad.connect()
    bad.close()
    assert rc is not None and str(rc) == "Not authorized"


def test_full_round_over_tls_with_auth_and_the_bundle_fetched_over_mqtt(tmp_path, boston_bundle, boston_shards):
    """Aggregator + 2 device processes, every one with its own user, over TLS with the fleet's
    CA; the limits are sized from the real bundle, which devices fetch through the broker."""
    shards, test_npz = boston_shards
    port = free_port()
    service_port = free_port()
    fleet_dir = generate(
        tmp_path / "fleet",
        port,
        "--tls",
        "--host",
        "localhost",
        "--bundle",
        str(boston_bundle),
        "--service-port",
        str(service_port),
    )
    broker = start_broker(fleet_dir, port)
    url = f"mqtts://localhost:{port}"
    service_url = f"mqtts://localhost:{service_port}"  # the aggregator's listener: its client ids are its own
    state = tmp_path / "agg-state"
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
                service_url,
                "--fleet",
                FLEET,
                "--rounds",
                "1",
                "--min-devices",
                "2",
                "--deadline",
                "60",
                "--state-dir",
                str(state),
                "--test-data",
                str(test_npz),
                "--username",
                "aggregator",
                "--password-file",
                str(fleet_dir / "aggregator" / "mqtt-password"),
                "--ca-file",
                str(fleet_dir / "ca.crt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "agg.log", "wb"),
            cwd=ROOT,
        )
        procs.append(agg)
        for i, (device, proto) in enumerate(zip(DEVICES, ("3.1.1", "5"))):
            cfg = device_config(tmp_path, fleet_dir, url, device, shards[i], proto)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg), "--max-rounds", "1"],
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / f"{device}.log", "wb"),
                    cwd=ROOT,
                )
            )
        assert agg.wait(180) == 0, (tmp_path / "agg.log").read_text()[-3000:]
        assert (
            "mqtt_disconnected" not in (tmp_path / "agg.log").read_text()
        )  # its lease and main connections never kicked each other
        for device, proc in zip(DEVICES, procs[1:]):
            assert proc.wait(60) == 0, (tmp_path / f"{device}.log").read_text()[-3000:]
        (rec,) = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
        assert rec["round"] == 1 and sorted(rec["devices"]) == list(DEVICES), rec
        for device in DEVICES:
            log = (tmp_path / f"{device}.log").read_text()
            assert "event=bundle_installed" in log, log[-2000:]
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(broker.proc)


def device_config(tmp: Path, fleet_dir: Path, url: str, device: str, data: Path, proto: str) -> Path:
    cfg = tmp / f"{device}.toml"
    cfg.write_text(
        f'device_id = "{device}"\nfleet = "{FLEET}"\nbroker = "{url}"\nmqtt_protocol = "{proto}"\n'
        f'bundle = "{tmp / (device + "-bundle")}"\ndata = "{data}"\nstate_dir = "{tmp / (device + "-state")}"\n\n'
        "[training]\nbatch_size = 8\nlocal_epochs = 1\nthreads = 1\n\n"
        f'[auth]\nusername = "{device}"\npassword_file = "{fleet_dir / "devices" / device / "mqtt-password"}"\n\n'
        f'[tls]\nca_file = "{fleet_dir / "ca.crt"}"\n'
    )
    return cfg


# ---------------------------------------------------------------- size limits


def real_update(num_params: int, device: str) -> bytes:
    delta = np.random.default_rng(0).normal(0, 0.01, num_params).astype(np.float32)
    return Update(secrets.token_hex(16), 1, device, "a" * 64, 10, 1.0, 0.5, secrets.token_hex(16), delta).encode()


def test_message_size_limit_drops_oversize_publishes_and_passes_real_ones_mqtt311(plain):
    limit = conf_value(plain.dir, "message_size_limit")
    packet_limit = conf_value(plain.dir, "max_packet_size")
    observer = client(plain, "aggregator").connected()
    observer.subscribe(T.all_updates)
    dev = client(plain, "dev-0").connected()
    try:
        # Over the payload limit: acknowledged (3.1.1 has no way to say no) and dropped.
        over = dev.publish(T.update("dev-0"), b"x" * (limit + 1))
        rc = dev.puback(over)
        assert rc is not None and not rc.is_failure
        # A real update frame and the largest frame the protocol allows for this model pass.
        dev.publish(T.update("dev-0"), real_update(PARAMS, "dev-0"))
        worst = bc.model_frame_bytes(PARAMS)
        dev.publish(T.update("dev-0"), b"w" * worst)
        dev.publish(T.update("dev-0"), b"z" * (protocol.DEFAULT_CHUNK_SIZE + protocol.HEADER_SIZE + protocol.MAX_META_BYTES))
        seen = [observer.wait_for(T.update("dev-0"))[1] for _ in range(3)]
        assert [len(p) for p in seen][1:] == [worst, protocol.DEFAULT_CHUNK_SIZE + protocol.HEADER_SIZE + protocol.MAX_META_BYTES]
        assert Update.decode(seen[0], PARAMS).device_id == "dev-0"
        assert observer.drain() == []
        assert dev.disconnects == []
        # Far over it (past max_packet_size): the sender is disconnected before the broker buffers it.
        hostile = client(plain, "dev-1").connected()
        hostile.publish(T.update("dev-1"), b"h" * (packet_limit + 1))
        deadline = time.monotonic() + 10
        while not hostile.disconnects:
            assert time.monotonic() < deadline, "no disconnect for a packet over max_packet_size"
            time.sleep(0.05)
        hostile.close()
        assert "disconnected due to oversize packet" in plain.text()
        assert observer.drain() == []
    finally:
        observer.close()
        dev.close()


def test_oversize_publish_over_mqtt5_is_refused_with_0x95_which_paho_treats_as_a_protocol_error(plain):
    """Observed with mosquitto 2.0.11 + paho 2.2: the broker answers an over-limit QoS 1 publish
    with PUBACK reason 0x95 "Packet too large" (not a reason code MQTT 5 allows in a PUBACK), and
    paho drops the connection as a protocol error instead of reporting it. The message is never
    delivered either way."""
    limit = conf_value(plain.dir, "message_size_limit")
    observer = client(plain, "aggregator").connected()
    observer.subscribe(T.all_updates)
    dev = client(plain, "dev-0", protocol="5").connected()
    try:
        mid = dev.publish(T.update("dev-0"), b"x" * (limit + 1))
        assert dev.puback(mid, timeout=3) is None
        assert dev.disconnects and "Protocol error" in dev.disconnects[0], dev.disconnects
        # paho cannot decode the PUBACK (0x95 has no PUBACK meaning), drops the connection, and
        # - left alone - reconnects and re-sends the same message forever (d1 = a re-send).
        assert any("Received malformed packet" in line for line in dev.log), dev.log
        # The broker did announce its limit: CONNACK's Maximum Packet Size is max_packet_size,
        # which paho 2.2 does not enforce on publish.
        packet_limit = conf_value(plain.dir, "max_packet_size")
        assert any(f"MaximumPacketSize : {packet_limit}" in line for line in dev.log), dev.log
        assert observer.drain(1.0) == []
    finally:
        dev.c.loop_stop()  # before paho re-sends it on its own reconnect
        observer.close()


def test_a_stalled_subscriber_queues_at_most_max_queued_bytes(plain):
    """A device with a persistent session that stops reading (here: offline) must not make the
    broker hold every global model published meanwhile: mosquitto's default would queue 1000."""
    queued_bytes = conf_value(plain.dir, "max_queued_bytes")
    inflight = conf_value(plain.dir, "max_inflight_messages")
    size = 100_000
    count = 2 * queued_bytes // size  # twice what the queue may hold
    sleeper = client(plain, "dev-0", clean_session=False).connected()
    sleeper.subscribe(T.global_model)
    sleeper.close()
    agg = client(plain, "aggregator").connected()
    mids = [agg.publish(T.global_model, i.to_bytes(4, "big") + b"g" * (size - 4)) for i in range(count)]
    assert all(agg.puback(mid) is not None for mid in mids)
    agg.close()
    back = client(plain, "dev-0", clean_session=False).connected()
    try:
        got = back.drain(2.0)
        assert got, "the persistent session queued nothing at all"
        assert len(got) * size <= queued_bytes + inflight * size, f"{len(got)} messages of {size} bytes queued"
        assert len(got) * size >= queued_bytes - size, "the queue holds less than max_queued_bytes"
        assert len(got) < count
    finally:
        back.close()


# ---------------------------------------------------------------- rotation


def test_rotating_a_device_password_with_mosquitto_passwd_and_sighup(plain):
    """The documented rotation: mosquitto_passwd edits our pure-Python password file in place;
    SIGHUP reloads it; the old password is refused and a client still connected with it is
    disconnected by mosquitto 2.0's reload."""
    old = password(plain.dir, "dev-0")
    connected = client(plain, "dev-0").connected()
    new = "rotated-" + secrets.token_urlsafe(16)
    subprocess.run(["mosquitto_passwd", "-b", str(plain.dir / "passwd"), "dev-0", new], check=True)
    assert stat.S_IMODE((plain.dir / "passwd").stat().st_mode) == 0o600
    plain.proc.send_signal(signal.SIGHUP)
    try:
        deadline = time.monotonic() + 10
        while not connected.disconnects:
            assert time.monotonic() < deadline, "a client on the old password stayed connected after SIGHUP"
            time.sleep(0.05)
        connected.c.loop_stop()
        refused = Client(plain.port, "dev-0", old)
        rc = refused.connect()
        refused.close()
        assert rc is not None and str(rc) == "Not authorized"
        fresh = Client(plain.port, "dev-0", new)
        rc = fresh.connect()
        fresh.close()
        assert rc is not None and not rc.is_failure
        # The other devices were not touched.
        other = client(plain, "dev-1")
        assert not other.connect().is_failure
        other.close()
    finally:
        connected.c.loop_stop()

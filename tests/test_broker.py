"""The embedded amqtt broker: `fleetlearn broker` as a real process, and EmbeddedBroker in a thread,
exercised with real paho clients (retained QoS 1 messages the size of bundle chunks and global models)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlearn.aggregator.broker import EmbeddedBroker
from tests.conftest import ROOT, free_port, stop_process, wait_port


class Client:
    def __init__(self, port: int, clean: bool = True):
        self.got: dict[str, list[tuple[bytes, bool]]] = {}
        self.cond = threading.Condition()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv311, clean_session=clean
        )
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, client, userdata, m) -> None:
        with self.cond:
            self.got.setdefault(m.topic, []).append((bytes(m.payload), bool(m.retain)))
            self.cond.notify_all()

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, qos=1)
        time.sleep(0.1)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def wait(self, topic: str, count: int = 1, timeout: float = 15.0) -> list[tuple[bytes, bool]]:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.got.get(topic, [])) < count:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{topic}: {len(self.got.get(topic, []))} of {count} messages")
                self.cond.wait(left)
            return list(self.got[topic])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def exercise(port: int) -> None:
    """Retained QoS 1 messages of bundle-chunk and global-model size reach a later subscriber
    byte for byte; live messages reach a current one; an empty retained payload clears."""
    chunk = bytes(range(256)) * 1024  # 256 KiB, a default bundle chunk
    model = b"\x01\x02\x03\x04" * (1 << 20)  # 4 MiB, a 1M-parameter global model
    pub = Client(port)
    pub.publish("fleetlearn/t/bundle/x/0", chunk, retain=True)
    pub.publish("fleetlearn/t/global", model, retain=True)
    pub.publish("fleetlearn/t/round", b"gone soon", retain=True)
    pub.publish("fleetlearn/t/round", b"", retain=True)

    sub = Client(port)
    sub.subscribe("fleetlearn/t/#")
    assert sub.wait("fleetlearn/t/bundle/x/0") == [(chunk, True)]
    assert sub.wait("fleetlearn/t/global") == [(model, True)]
    pub.publish("fleetlearn/t/update/dev-1", b"delta", retain=False)
    assert sub.wait("fleetlearn/t/update/dev-1") == [(b"delta", False)]
    time.sleep(0.2)
    assert "fleetlearn/t/round" not in sub.got  # cleared before anyone subscribed
    pub.close()
    sub.close()


def test_fleetlearn_broker_process_serves_retained_qos1_and_exits_0_on_sigterm(amqtt_broker):
    exercise(amqtt_broker.port)
    proc = amqtt_broker.proc
    assert stop_process(proc, signal.SIGTERM) == 0
    log = amqtt_broker.log.read_text()
    assert "event=broker_started" in log and "event=broker_stopped" in log
    assert "level=error" not in log  # the fixture's port probe is not an error


def test_broker_process_exits_0_on_sigint(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetlearn.cli", "broker", "--embedded", "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE
    )
    try:
        wait_port(port)
        c = Client(port)
        c.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)


@pytest.mark.parametrize("which", [["--embedded"], []], ids=["amqtt", "mosquitto"])
def test_broker_on_a_taken_port_exits_2_with_one_line(tmp_path, which):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "fleetlearn.cli", "broker", *which, "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fleetlearn broker: error: cannot run the broker on 127.0.0.1:{port}")


def test_embedded_broker_in_a_thread():
    with EmbeddedBroker("127.0.0.1", 0) as broker:
        assert broker.port != 0 and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        exercise(broker.port)
        # A second broker on the same port fails at start() with the reason.
        with pytest.raises(RuntimeError, match="cannot listen"):
            EmbeddedBroker("127.0.0.1", broker.port).start()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()
    # Stopping twice, or a broker never started, is harmless.
    broker.stop()
    EmbeddedBroker("127.0.0.1", 0).stop()


def test_embedded_broker_accepts_any_credentials_and_persistent_sessions():
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    try:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="with-user", protocol=paho.MQTTv311, clean_session=False)
        c.username_pw_set("someone", "anything")
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set() if not a[3].is_failure else None
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert connected.wait(10)
        c.disconnect()
        c.loop_stop()
    finally:
        broker.stop()


def start_broker_cli(log, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetlearn.cli", "broker", "--port", str(port), *args],
        cwd=ROOT,
        stderr=open(log, "wb"),
        env={**os.environ, **(env or {})},
    )
    wait_port(port)
    return proc, port


def test_fleetlearn_broker_prefers_mosquitto_and_says_so(tmp_path):
    from fleetlearn.aggregator.broker_mosquitto import mosquitto_path

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed: `fleetlearn broker` serves amqtt (tested above)")
    log = tmp_path / "broker.log"
    proc, port = start_broker_cli(log)
    try:
        exercise(port)
        assert stop_process(proc, signal.SIGTERM) == 0
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "event=broker_started broker=mosquitto version=2." in text and "event=broker_stopped" in text
    # The mosquitto child went with it: nothing listens any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_fleetlearn_broker_without_mosquitto_serves_amqtt_and_says_so(tmp_path):
    log = tmp_path / "broker.log"
    proc, port = start_broker_cli(log, env={"FLEETLEARN_MOSQUITTO": "none"})
    try:
        exercise(port)
        assert stop_process(proc, signal.SIGTERM) == 0
    finally:
        stop_process(proc)
    assert "event=broker_started broker=amqtt" in log.read_text()

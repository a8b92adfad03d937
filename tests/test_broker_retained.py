"""Retained messages go to a subscription, and only once: pinned on the embedded broker
(`fleetlearn broker --embedded`, amqtt 0.12.1 wrapped by fleetlearn.aggregator.amqtt_fixes) and on
mosquitto, the reference, with real paho clients over loopback.

Unwrapped amqtt 0.12.1 fails both tests: on every CONNECT it sends the connecting client the
retained messages matching *every* topic filter any client holds (its loop runs over the
broker's whole subscription table), before and besides what the client subscribes to.
"""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Broker

SETTLE_S = 1.0  # how long a client listens for messages that must not come


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    b = Broker(request.param, tmp_path).start()
    yield b
    b.stop()


class Sub:
    """A paho client recording (topic, payload, retain) for every message, in order."""

    def __init__(self, port: int, client_id: str | None = None, clean: bool = True):
        self.got: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=clean,
        )
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def _on_message(self, client, userdata, m) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload), bool(m.retain)))

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(10), "no SUBACK"

    def settle(self) -> list[tuple[str, bytes, bool]]:
        time.sleep(SETTLE_S)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def publish_retained(port: int, msgs: dict[str, bytes]) -> None:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv311)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for topic, payload in msgs.items():
        info = pub.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    pub.disconnect()
    pub.loop_stop()


def test_clean_session_reconnect_with_a_used_client_id_gets_only_what_it_subscribes(broker):
    publish_retained(broker.port, {"a/global": b"G", "a/metrics": b"M"})
    first = Sub(broker.port, client_id="probe-1")
    first.subscribe("a/global", "a/metrics")
    assert sorted(first.settle()) == [("a/global", b"G", True), ("a/metrics", b"M", True)]
    first.close()
    # Another client holds a subscription on a/metrics (the monitor, say) from now on.
    other = Sub(broker.port)
    other.subscribe("a/metrics")
    assert other.settle() == [("a/metrics", b"M", True)]
    # Same client id, clean session, subscribed to a/global only.
    again = Sub(broker.port, client_id="probe-1")
    again.subscribe("a/global")
    try:
        assert again.settle() == [("a/global", b"G", True)]
    finally:
        again.close()
        other.close()


def test_a_later_subscriber_gets_a_retained_message_once(broker):
    publish_retained(broker.port, {"b/global": b"G", "b/round": b"R"})
    early = Sub(broker.port)
    early.subscribe("b/#")
    assert sorted(early.settle()) == [("b/global", b"G", True), ("b/round", b"R", True)]
    late = Sub(broker.port)
    late.subscribe("b/global")
    try:
        assert late.settle() == [("b/global", b"G", True)]
    finally:
        late.close()
        early.close()


def test_a_persistent_session_gets_retained_messages_on_subscribe_only(broker):
    """MQTT 3.1.1 sends retained messages in answer to SUBSCRIBE (3.3.1.3), not on a resumed
    session's CONNECT; a device that resubscribes after a reconnect must see each one once."""
    publish_retained(broker.port, {"c/global": b"G"})
    cid = f"dev-{uuid.uuid4().hex[:6]}"
    first = Sub(broker.port, client_id=cid, clean=False)
    first.subscribe("c/global")
    assert first.settle() == [("c/global", b"G", True)]
    first.close()
    again = Sub(broker.port, client_id=cid, clean=False)
    assert again.settle() == []  # resumed session: nothing unsolicited
    again.subscribe("c/global")  # what MqttLink does after every connect
    try:
        assert again.settle() == [("c/global", b"G", True)]
    finally:
        again.close()

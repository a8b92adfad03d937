"""The MQTT link's publish API on a real mosquitto: QoS 1 messages are tracked until the broker
acknowledges them (also those queued while the broker was away), and retained ones can be put
back after a broker restart that lost them (persistence off)."""

from __future__ import annotations

import time
import uuid

from fleetlearn.edge_runtime.core.mqtt import LinkOptions, MqttLink
from tests.peers import Recorder


def _link(url: str) -> MqttLink:
    link = MqttLink(
        LinkOptions(url=url, client_id=f"link-test-{uuid.uuid4().hex[:6]}", backoff_min=0.1, backoff_max=0.5),
        on_message=lambda t, p: None,
    )
    link.start()
    assert link.wait_connected(10)
    return link


def test_flush_waits_for_every_puback_including_those_queued_offline(mosquitto):
    link = _link(mosquitto.url)
    try:
        for i in range(200):
            link.publish("t/link/a", b"x" * 1000, qos=1)
        assert link.flush(10) and link.unacknowledged() == 0
        mosquitto.stop()
        end = time.monotonic() + 10
        while link.connected.is_set() and time.monotonic() < end:
            time.sleep(0.05)
        link.publish("t/link/a", b"while away", qos=1)  # paho queues it (rc NO_CONN)
        link.publish("t/link/a", b"fire and forget", qos=0)  # QoS 0 is never tracked
        assert link.unacknowledged() == 1 and not link.flush(0.3)
        mosquitto.start()
        assert link.flush(20), "the queued message was never acknowledged after the reconnect"
        assert link.unacknowledged() == 0
    finally:
        link.stop()


def test_republish_retained_puts_back_what_a_restarted_broker_lost(mosquitto):
    link = _link(mosquitto.url)
    try:
        link.publish("t/link/keep", b"v1", retain=True)
        link.publish("t/link/keep", b"v2", retain=True)  # only the last payload is kept
        link.publish("t/link/gone", b"x", retain=True)
        link.publish("t/link/gone", b"", retain=True)  # cleared: forgotten
        assert link.flush(10)
        mosquitto.restart(down_s=0.3)  # persistence off: every retained message is lost
        assert link.wait_connected(20)
        assert link.republish_retained() == 1 and link.flush(10)
        rec = Recorder(mosquitto.url, ["t/link/#"], "late")
        try:
            assert rec.wait(lambda t, p: t == "t/link/keep" and p, timeout=10) == b"v2"
            time.sleep(0.3)
            assert [(t, p, r) for t, p, r in rec.snapshot()] == [("t/link/keep", b"v2", True)]
        finally:
            rec.close()
    finally:
        link.stop()


def test_a_clean_stop_disconnects_without_the_last_will_and_delivers_what_was_queued(mosquitto):
    """Publishes from other threads only queue (the network thread alone writes the socket, which
    TLS needs); stop() must still deliver them and say DISCONNECT, so no Last Will fires."""
    import threading

    rec = Recorder(mosquitto.url, ["t/will/#"])
    link = MqttLink(
        LinkOptions(url=mosquitto.url, client_id=f"link-will-{uuid.uuid4().hex[:6]}", will=("t/will/gone", b"will", 1, False)),
        on_message=lambda t, p: None,
    )
    link.start()
    assert link.wait_connected(10)
    sent = [threading.Thread(target=link.publish, args=("t/will/msg", f"m{i}".encode())) for i in range(20)]
    for t in sent:
        t.start()
    for t in sent:
        t.join()
    link.stop()
    time.sleep(1.0)
    with rec.cond:
        payloads = sorted(p for topic, p, _ in rec.msgs)
    rec.close()
    assert b"will" not in payloads and payloads == sorted(f"m{i}".encode() for i in range(20))

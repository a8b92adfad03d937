"""A real MQTT peer for tests: a paho client on the test's broker that records what it sees.

It speaks the real protocol (frames from fleetlearn.edge_runtime.core.protocol) over a real broker; it stands
in for the other side of a conversation (the aggregator when testing a device, devices when
testing the aggregator), never for the code under test.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Peer:
    def __init__(self, url: str, subscriptions: list[str] = ()):
        host, port = url.split("://", 1)[1].split(":")
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-peer-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect(host, int(port))
        self.client.loop_start()
        for topic in subscriptions:
            self.client.subscribe(topic, qos=1)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def wait_for(self, match: Callable[[str, bytes], bool], timeout: float = 20.0) -> tuple[str, bytes]:
        """The first message (topic, payload) for which `match` is true; others are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching message arrived in time")
            try:
                topic, payload, _ = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if match(topic, payload):
                return topic, payload

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                topic, payload, _ = self.messages.get_nowait()
            except queue.Empty:
                return out
            out.append((topic, payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Recorder:
    """A paho client that records every message on `topics` and re-subscribes after the
    broker comes back (a broker restart drops every session: persistence is off)."""

    def __init__(self, url: str, topics: list[str] | tuple[str, ...], name: str = "rec"):
        host, port = url.split("://", 1)[1].split(":")
        self.topics = list(topics)
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fault-{name}-{uuid.uuid4().hex[:6]}")
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        if self.topics and not self._subscribed.wait(10):
            raise TimeoutError("recorder: no SUBACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, m) -> None:
        with self.cond:
            self.msgs.append((m.topic, bytes(m.payload), bool(m.retain)))
            self.cond.notify_all()

    def wait(self, match: Callable[[str, bytes], object], timeout: float = 30.0):
        """The first recorded message (from the start) for which match() is truthy."""
        end = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for topic, payload, _ in self.msgs[seen:]:
                    try:
                        out = match(topic, payload)
                    except Exception:
                        out = None
                    if out:
                        return out
                seen = len(self.msgs)
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching message in {timeout}s; last topics {[t for t, _, _ in self.msgs][-10:]}")
                self.cond.wait(left)

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self.cond:
            return list(self.msgs)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

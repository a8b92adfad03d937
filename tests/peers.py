"""A real MQTT peer for tests: a paho client on the test's broker that records what it sees.

It speaks the real protocol (frames from edge_runtime.protocol) over a real broker; it stands
in for the other side of a conversation (the aggregator when testing a device, devices when
testing the aggregator), never for the code under test.
"""

from __future__ import annotations

import queue
import time
import uuid
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Peer:
    def __init__(self, url: str, subscriptions: list[str] = ()):
        host, port = url.split("://", 1)[1].split(":")
        self.messages: "queue.Queue[tuple[str, bytes, bool]]" = queue.Queue()
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

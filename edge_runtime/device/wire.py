"""A device's side of messages over the broker's limit (protocol/parts.py): its update sent in
parts, and the global model put back together from its retained parts."""

from __future__ import annotations

import time

from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import Reassembler, max_body_bytes, max_frame_bytes, split_message

PART_TIMEOUT_S = 600.0


def publish_update(link: MqttLink, topic: str, payload: bytes, max_message_size: int) -> int:
    """QoS 1, whole or in parts (the same parts every time: a re-send continues a partial
    message at the aggregator). Returns how many messages went out."""
    parts = split_message(payload, max_message_size or None)
    for part in parts:
        link.publish(topic, part, qos=1)
    return len(parts)


class GlobalParts:
    """The retained parts on `global/part/<i>`, reassembled (bounded by the largest model a
    device accepts; at most two partial models, e.g. the last round's and this one's)."""

    def __init__(self, max_params: int):
        self.reassembler = Reassembler(max_total=max_frame_bytes(max_body_bytes(max_params)), per_sender=2, max_partials=2, timeout=PART_TIMEOUT_S)

    def feed(self, payload: bytes) -> bytes | None:
        """The whole GLOBAL frame once complete; None for a cleared part or while incomplete."""
        if not payload:
            return None
        return self.reassembler.feed("global", payload, time.monotonic())

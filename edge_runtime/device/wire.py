"""A device's side of compressed updates and of messages over the broker's limit: its update
encoded as the round asks (with the error-feedback residual, device/feedback.py), sent whole or
in parts (protocol/parts.py), and the global model put back together from its retained parts."""

from __future__ import annotations

from pathlib import Path

from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import (
    Compression,
    GlobalParts,
    Topics,
    Update,
    split_message,
)
from fleetlearn.edge_runtime.core.protocol.frame import Signer
from fleetlearn.edge_runtime.device.feedback import ErrorFeedback
from fleetlearn.edge_runtime.device.state import load_pending_update


def publish_update(link: MqttLink, topic: str, payload: bytes, max_message_size: int) -> int:
    """QoS 1, whole or in parts (the same parts every time: a re-send continues a partial
    message at the aggregator). Returns how many messages went out."""
    parts = split_message(payload, max_message_size or None)
    for part in parts:
        link.publish(topic, part, qos=1)
    return len(parts)


class DeviceWire:
    """What the agent needs of this module, in one object (keeps agent.py about rounds)."""

    def __init__(self, state_dir: Path, topics: Topics, device_id: str):
        self.state_dir = Path(state_dir)
        self.topic = topics.update(device_id)
        self._part_prefix = topics.global_part(0).rsplit("/", 1)[0] + "/"
        self.feedback = ErrorFeedback(self.state_dir)
        self.global_parts = GlobalParts()

    def is_global_part(self, topic: str) -> bool:
        return topic.startswith(self._part_prefix)

    def encode(self, update: Update, compression: Compression, sign: Signer | None) -> bytes:
        """The update's frame; with error feedback the residual is durable before this returns."""
        return self.feedback.encode(update, compression, load_pending_update(self.state_dir), sign=sign)

    def send(self, link: MqttLink, payload: bytes, max_message_size: int) -> int:
        return publish_update(link, self.topic, payload, max_message_size)

    def refused(self, nonce: str) -> None:
        """The aggregator refused update `nonce`: its sent values go back into the residual."""
        pending = load_pending_update(self.state_dir)
        if pending is not None:
            self.feedback.settle(nonce, refused_payload=pending)

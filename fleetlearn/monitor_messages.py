"""Turn one MQTT message of a fleet into one typed message, or a ProtocolError.

Every decoder used here is the wire protocol's own (fleetlearn.edge_runtime.core.protocol): they bound sizes
and validate every field, so a hostile or broken publisher costs the monitor one ignored
message. This module adds only the routing by topic and two small views: an upload seen on
`update/<device>` (the protocol's UpdateHeader: we keep its round, never its weights) and the
global model's header.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, RoundMetrics, RoundState, Status, Topics, UpdateHeader


@dataclass(frozen=True)
class UploadSeen:
    """A device published an update for `round` of `run_id` (the delta itself is dropped)."""

    device_id: str
    run_id: str
    round: int
    bytes: int


@dataclass(frozen=True)
class GlobalSeen:
    """The header of the retained global model: which round it opens, and with which model."""

    run_id: str
    round: int
    model_hash: str
    train: bool
    total_rounds: int
    deadline: float


@dataclass(frozen=True)
class DeviceForgotten:
    """An empty retained status: someone cleared the device from the broker on purpose."""

    device_id: str


Message = RoundState | Status | Ack | RoundMetrics | UploadSeen | GlobalSeen | DeviceForgotten | None


def decode_message(topics: Topics, topic: str, payload: bytes) -> Message:
    """Decode by topic. Returns None for topics and empty payloads that carry nothing for us."""
    payload = bytes(payload)
    if topic == topics.round:
        return RoundState.decode(payload) if payload else None
    if topic == topics.metrics:
        return RoundMetrics.decode(payload) if payload else None
    if topic == topics.global_model:
        return _global(payload) if payload else None
    if topic.startswith(topics.base + "/status/"):
        device = topics.device_of(topic, "status")
        if not payload:
            return DeviceForgotten(device)
        status = Status.decode(payload)
        if status.device_id != device:
            raise ProtocolError(f"status on {topic} names device {status.device_id!r}")
        return status
    if topic.startswith(topics.base + "/update/"):
        return _upload(topics.device_of(topic, "update"), payload)
    if topic.startswith(topics.base + "/ack/"):
        device = topics.device_of(topic, "ack")
        ack = Ack.decode(payload)
        if ack.device_id != device:
            raise ProtocolError(f"ack on {topic} names device {ack.device_id!r}")
        return ack
    return None


def _global(payload: bytes) -> GlobalSeen:
    g = GlobalModel.decode(payload)  # validates the frame; the weights are dropped right here
    return GlobalSeen(g.run_id, g.round, g.model_hash, g.train, g.total_rounds, g.deadline)


def _upload(device: str, payload: bytes) -> UploadSeen:
    """Check the frame (magic, sizes, crc) and read round/run from its meta.

    Update.decode needs the model's parameter count, which a monitor does not know; the
    frame checks plus the header's field checks are what it needs to count an upload honestly."""
    up = UpdateHeader.peek(payload, verify_body=True).require("round", "run_id", "device_id")
    if up.device_id != device:
        raise ProtocolError(f"update on the topic of {device!r} names device {up.device_id!r:.70}")
    return UploadSeen(device, str(up.run_id), int(up.round or 0), up.size)

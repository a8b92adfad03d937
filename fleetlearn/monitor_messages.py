"""Turn one MQTT message of a fleet into one typed message, or a ProtocolError.

Every decoder used here is the wire protocol's own (fleetlearn.edge_runtime.core.protocol): they bound sizes
and validate every field, so a hostile or broken publisher costs the monitor one ignored
message. This module adds only the routing by topic and two small views: an upload seen on
`update/<device>` (the protocol's UpdateHeader: we keep its round, never its weights) and the
global model's header.

Messages over the aggregator's --max-message-size arrive as PART frames (protocol/parts.py);
`Parts` puts them back together with the protocol's own Reassembler before decoding: the global
model from `global/part/<i>` with a device's limits (protocol.GlobalParts), an update from
`update/<device>` with at most one partial update per device and `UPDATE_PARTIALS` in all (the
monitor only counts uploads: past that bound an upload is seen through its ack instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import (
    MAX_MODEL_PARAMS,
    PART_TIMEOUT_S,
    Ack,
    GlobalModel,
    GlobalParts,
    PartsBusy,
    Reassembler,
    RoundMetrics,
    RoundState,
    Status,
    Topics,
    UpdateHeader,
    is_part,
    max_body_bytes,
    max_frame_bytes,
)

log = logging.getLogger("fleetlearn.monitor")

UPDATE_PARTIALS = 16  # partial updates held at once (each bounded by the largest model a device accepts)


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


class Parts:
    """Whole messages from PART frames, per topic (module docstring). Time is passed in."""

    def __init__(self, topics: Topics, max_params: int = MAX_MODEL_PARAMS):
        self.topics = topics
        self.global_parts = GlobalParts(max_params)
        self.updates = Reassembler(
            max_total=max_frame_bytes(max_body_bytes(max_params)),
            per_sender=1,
            max_partials=UPDATE_PARTIALS,
            timeout=PART_TIMEOUT_S,
        )
        self._part_prefix = topics.global_part(0).rsplit("/", 1)[0] + "/"

    def whole(self, topic: str, payload: bytes, now: float) -> tuple[str, bytes] | None:
        """(topic, message) to decode: the message itself, or once its last part is in the whole
        message under the topic it stands for (`global` for the global model's parts); None
        while incomplete or for a cleared part; ProtocolError (one line) for a refused part."""
        if topic.startswith(self._part_prefix):
            whole = self.global_parts.feed(payload, now)
            return None if whole is None else (self.topics.global_model, whole)
        if topic.startswith(self.topics.base + "/update/") and is_part(payload):
            device = self.topics.device_of(topic, "update")
            try:
                whole = self.updates.feed(device, payload, now)
            except PartsBusy as exc:  # load, not an attack: the ack will count this upload
                log.debug("event=update_part_skipped device=%s reason=%r", device, exc.reason)
                return None
            return None if whole is None else (topic, whole)
        return topic, payload


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

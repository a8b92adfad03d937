"""What the aggregator puts on the wire: the bundle, global models, round states, acks and the
round metrics, all QoS 1 through the MQTT link (which tracks them until acknowledged and
remembers the retained ones for a republish after a broker restart: edge_runtime/core/mqtt.py).

    pub = Publisher(link, topics, run_id, signing, events)
    pub.bundle(plan)                               # chunks, then the announcement (retained)
    pub.global_model(g)                            # retained (in parts over max_message_size); returns bytes sent
    pub.round_state(RoundState(...))               # retained
    pub.ack(Ack(...))                              # to ack/<device>
    pub.metrics(record)                            # retained round record
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fleetlearn.aggregator.distribution import BundlePlan, chunk_messages, clear_messages
from fleetlearn.aggregator.events import Events
from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import (
    Ack,
    BundleAnnouncement,
    GlobalModel,
    RoundMetrics,
    RoundState,
    Topics,
    split_message,
)


class Publisher:
    def __init__(self, link: MqttLink, topics: Topics, signing: Any, events: Events, max_message_size: int | None = None):
        self.link = link
        self.max_message_size = max_message_size
        self._global_in_parts = False
        self.topics = topics
        self.signing = signing
        self.events = events
        self._cleared_hashes: set[str] = set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """QoS 1; returns the bytes sent (counted whether or not the link is up: it queues)."""
        self.link.publish(topic, payload, qos=1, retain=retain)
        return len(payload)

    def global_model(self, g: GlobalModel) -> int:
        """Retained on `global`, or, over the message limit, as retained PART frames on
        `global/part/<i>` (protocol/parts.py) with `global` itself cleared, so no device mistakes
        an older whole frame there for the current model."""
        parts = split_message(g.encode(sign=self.signing.sign), self.max_message_size)
        if len(parts) == 1:
            return self.publish(self.topics.global_model, parts[0], retain=True)
        sent = 0
        if not self._global_in_parts:
            sent += self.publish(self.topics.global_model, b"", retain=True)
            self._global_in_parts = True
        for i, part in enumerate(parts):
            sent += self.publish(self.topics.global_part(i), part, retain=True)
        return sent

    def round_state(self, state: RoundState) -> int:
        return self.publish(self.topics.round, state.encode(), retain=True)

    def ack(self, ack: Ack) -> int:
        return self.publish(self.topics.ack(ack.device_id), ack.encode())

    def metrics(self, record: RoundMetrics | dict[str, Any]) -> int:
        """The retained round record (RoundMetrics.encode cuts the device list to fit a JSON message)."""
        if not isinstance(record, RoundMetrics):
            record = RoundMetrics.from_doc(record)
        return self.publish(self.topics.metrics, record.encode(), retain=True)

    # ------------------------------------------------------------ bundle

    def bundle(self, plan: BundlePlan) -> None:
        a = plan.announcement
        t0 = time.monotonic()
        announcement = self.signing.sign_announcement(a.encode())
        if self.max_message_size is not None and len(announcement) > self.max_message_size:
            raise UsageError(
                f"the bundle announcement is {len(announcement)} bytes, over --max-message-size {self.max_message_size}"
            )
        for topic, payload in chunk_messages(plan, self.topics):
            self.publish(topic, payload, retain=True)
        # The announcement goes last: a device that sees it finds every chunk already there.
        self.publish(self.topics.bundle, announcement, retain=True)
        self.events.log(
            "bundle_published",
            None,
            model_hash=a.model_hash[:12],
            bytes=a.total_bytes,
            chunks=a.chunks,
            chunk_size=a.chunk_size,
            s=time.monotonic() - t0,
        )

    def on_bundle_announcement(self, plan: BundlePlan, payload: bytes) -> None:
        """A retained announcement on our fleet: another model's (an older run) is replaced by
        ours, and its chunks cleared so the broker does not keep them forever."""

        if not payload:
            return
        try:
            old = BundleAnnouncement.decode(payload)
        except Exception as exc:
            self.events.log("bundle_announcement_ignored", None, level=logging.WARNING, reason=str(exc)[:200])
            return
        if old.model_hash == plan.model_hash or old.model_hash in self._cleared_hashes:
            return
        self._cleared_hashes.add(old.model_hash)
        for topic, empty in clear_messages(old, self.topics):
            self.publish(topic, empty, retain=True)
        self.publish(self.topics.bundle, self.signing.sign_announcement(plan.announcement.encode()), retain=True)
        self.events.log("old_bundle_cleared", None, model_hash=old.model_hash[:12], chunks=old.chunks)

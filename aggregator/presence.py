"""Which devices are connected, from their retained status topics (`status/<device>`, the
device's own Status messages and the broker's `offline` Last Will).

    presence = Presence(topics)
    presence.on_status(topic, payload)     # every message on status/+ (retained ones at subscribe)
    presence.connected()                   # sorted ids available to invite: not offline, not ineligible

An `ineligible` device (its [eligibility] rules say no training now: too hot, outside its hours,
on battery) is connected but not available, so sampling does not spend an invitation on it; it
counts again once it reports another state. A device in `error` still counts as available: it answers, and its status only returns to idle
after a round it trained in, so leaving it out would leave it out for good. Input is hostile: a
malformed status or one whose device_id is not its topic's is refused with a ProtocolError and
changes nothing; an empty payload (a cleared retained status) forgets the device. The table is
bounded (MAX_DEVICES): beyond it new devices are ignored until others are forgotten.
"""

from __future__ import annotations

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Status, Topics

MAX_DEVICES = 1_000_000
OFFLINE = "offline"
UNAVAILABLE = (OFFLINE, "ineligible")  # states a round should not invite


class Presence:
    def __init__(self, topics: Topics, max_devices: int = MAX_DEVICES):
        self.topics = topics
        self.max_devices = max_devices
        self.states: dict[str, str] = {}

    def is_status(self, topic: str) -> bool:
        return topic.startswith(f"{self.topics.base}/status/")

    def on_status(self, topic: str, payload: bytes) -> Status | None:
        """Take one status message; returns it decoded (None for a cleared one)."""
        device = self.topics.device_of(topic, "status")
        if not payload:
            self.states.pop(device, None)
            return None
        st = Status.decode(payload)
        if st.device_id != device:
            raise ProtocolError(f"status on {topic} names device {st.device_id!r}")
        if device in self.states or len(self.states) < self.max_devices:
            self.states[device] = st.state
        return st

    def connected(self) -> list[str]:
        return sorted(d for d, s in self.states.items() if s not in UNAVAILABLE)

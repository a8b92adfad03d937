"""The topic tree of a fleet: every topic, who publishes it and who reads it.

`TOPIC_TREE` is the one table of topics. `Topics` names them for one fleet, and
`Topics.grants(role)` turns the table into the access a role needs, which the broker ACL
(fleetlearn.provisioning.acl) is rendered from: a topic added here is granted there, to the
roles named here and to no one else.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import NAME_RE

ROOT = "fleetlearn"

# Roles of the clients on a fleet's broker.
AGGREGATOR = "aggregator"
DEVICE = "device"
MONITOR = "monitor"  # read-only: reads every topic of the fleet
ROLES = (AGGREGATOR, DEVICE, MONITOR)

DEVICE_SEGMENT = "{device}"  # a path segment naming one device


@dataclass(frozen=True)
class TopicRule:
    """One topic (or one topic per device, or a subtree) under `fleetlearn/<fleet>/`."""

    path: str  # relative to the fleet's base; DEVICE_SEGMENT marks a per-device topic, "#" a subtree
    writer: str  # the one role that publishes it
    readers: frozenset[str]  # roles that receive it (the monitor reads everything)
    retained: bool
    doc: str

    @property
    def per_device(self) -> bool:
        return DEVICE_SEGMENT in self.path


def _rule(path: str, writer: str, readers: tuple[str, ...], retained: bool, doc: str) -> TopicRule:
    return TopicRule(path, writer, frozenset((*readers, MONITOR)), retained, doc)


TOPIC_TREE: tuple[TopicRule, ...] = (
    # The aggregator reads its own retained topics back at start (an older run's bundle is cleared).
    _rule("global", AGGREGATOR, (AGGREGATOR, DEVICE), True, "binary GLOBAL frame: round, model hash, flat weights, round config"),
    _rule(
        "global/part/#",
        AGGREGATOR,
        (AGGREGATOR, DEVICE),
        True,
        "binary PART frames of a global model over --max-message-size, on global/part/<i>",
    ),
    _rule("round", AGGREGATOR, (AGGREGATOR, DEVICE), True, "JSON round state (open / closed / finished / failed)"),
    _rule("metrics", AGGREGATOR, (AGGREGATOR, DEVICE), True, "JSON metrics of the last closed round (RoundMetrics)"),
    _rule(
        "leader",
        AGGREGATOR,
        (AGGREGATOR, DEVICE),
        True,
        "JSON lease: the aggregator run that leads the fleet; its Last Will releases it",
    ),
    _rule("bundle", AGGREGATOR, (AGGREGATOR, DEVICE), True, "JSON bundle announcement (manifest + chunking)"),
    _rule("bundle/#", AGGREGATOR, (AGGREGATOR, DEVICE), True, "binary BUNDLE_CHUNK frames on bundle/<hash>/<i>"),
    _rule(f"update/{DEVICE_SEGMENT}", DEVICE, (AGGREGATOR,), False, "binary UPDATE frame: device -> aggregator weight delta"),
    _rule(f"ack/{DEVICE_SEGMENT}", AGGREGATOR, (DEVICE,), False, "JSON acknowledgement of one update (accepted or the reason)"),
    _rule(f"status/{DEVICE_SEGMENT}", DEVICE, (AGGREGATOR,), True, "JSON device status; the MQTT Last Will sets 'offline'"),
)


@dataclass(frozen=True)
class Grant:
    """`access` ("read", "write" or "readwrite") on the topic filter `topic`."""

    access: str
    topic: str


@dataclass(frozen=True)
class Topics:
    """All topic names of one fleet, in one place."""

    fleet: str
    root: str = ROOT

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.fleet):
            raise ProtocolError(f"fleet name {self.fleet!r} is not safe in a topic")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.fleet}"

    @property
    def global_model(self) -> str:
        return f"{self.base}/global"

    def global_part(self, index: int) -> str:
        return f"{self.base}/global/part/{index}"

    @property
    def global_parts(self) -> str:
        return f"{self.base}/global/part/+"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def leader(self) -> str:
        return f"{self.base}/leader"

    @property
    def bundle(self) -> str:
        return f"{self.base}/bundle"

    def bundle_chunk(self, model_hash: str, index: int) -> str:
        return f"{self.base}/bundle/{model_hash}/{index}"

    def bundle_chunks(self, model_hash: str) -> str:
        return f"{self.base}/bundle/{model_hash}/+"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{device_id}"

    def ack(self, device_id: str) -> str:
        return f"{self.base}/ack/{device_id}"

    def status(self, device_id: str) -> str:
        return f"{self.base}/status/{device_id}"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/update/+"

    @property
    def all_status(self) -> str:
        return f"{self.base}/status/+"

    def device_of(self, topic: str, kind: str) -> str:
        """The device id in `<base>/<kind>/<device>`; raises ProtocolError for any other shape."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not a {kind} topic of fleet {self.fleet}")
        device = topic[len(prefix) :]
        if not NAME_RE.fullmatch(device):
            raise ProtocolError(f"topic {topic!r} names an invalid device id")
        return device

    def grants(self, role: str, device_id: str | None = None) -> list[Grant]:
        """What `role` may do on this fleet's topics, in TOPIC_TREE order.

        A device's grants name its own per-device topics only (`device_id`); the aggregator and
        the monitor get every device's, as a `+` wildcard."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}, one of {ROLES}")
        if role == DEVICE and (device_id is None or not NAME_RE.fullmatch(device_id)):
            raise ProtocolError(f"a device's grants need a valid device id, got {device_id!r}")
        out = []
        for rule in TOPIC_TREE:
            access = ("read" if role in rule.readers else "") + ("write" if role == rule.writer else "")
            if access:
                segment = device_id if role == DEVICE else "+"
                out.append(Grant(access, f"{self.base}/{rule.path.replace(DEVICE_SEGMENT, str(segment))}"))
        return out

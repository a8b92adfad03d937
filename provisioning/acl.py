"""mosquitto's ACL file for one fleet, derived from the protocol's topic tree.

Every line comes from `Topics.grants(role)` (fleetlearn.edge_runtime.core.protocol.topics,
TOPIC_TREE): a topic added to the protocol is granted here to the roles the tree names, and no
topic is granted that the protocol does not have.
"""

from __future__ import annotations

from fleetlearn.edge_runtime.core.protocol import Topics
from fleetlearn.edge_runtime.core.protocol.topics import AGGREGATOR, DEVICE, MONITOR
from fleetlearn.provisioning.spec import MONITOR_USER, FleetSpec


def _block(user: str, grants) -> list[str]:
    return [f"user {user}", *(f"topic {g.access} {g.topic}" for g in grants), ""]


def acl_text(spec: FleetSpec) -> str:
    """One explicit `user` block per client. No `pattern` lines: a pattern applies to every user
    (the aggregator and the monitor too), which is easy to get wrong. No anonymous block: a
    client not listed here can neither publish nor receive anything, $SYS included."""
    topics = Topics(spec.fleet)
    lines = [
        f"# mosquitto ACL for fleetlearn fleet {spec.fleet!r}, written by `fleetlearn broker-config`.",
        "# mosquitto checks `write` when a client publishes (a Last Will included, when it fires) and",
        "# `read` for every message it would deliver: a subscription to a topic a client may not read",
        "# is granted but stays silent. Each line is derived from the wire protocol's topic tree.",
        "",
        "# The aggregator owns the round: it alone publishes models, round state, metrics, the bundle",
        "# and acknowledgements (reading its retained topics back at start), and it reads every",
        "# update and device status.",
        *_block(spec.aggregator_user, topics.grants(AGGREGATOR)),
    ]
    if spec.monitor:
        lines += [
            "# Read-only view of every topic of the fleet for `fleetlearn monitor`.",
            *_block(MONITOR_USER, topics.grants(MONITOR)),
        ]
    lines.append("# Each device publishes only its own update and status, and reads the fleet's shared state and its own acks.")
    for device in spec.devices:
        lines += _block(device, topics.grants(DEVICE, device))
    return "\n".join(lines)

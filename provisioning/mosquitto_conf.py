"""mosquitto.conf for one fleet: limits, persistence, one listener; every path in it absolute.

Why each setting exists is said in a comment inside the file written (docs/security-broker.md
has the long version).
"""

from __future__ import annotations

from fleetlearn.provisioning.limits import Limits
from fleetlearn.provisioning.spec import FleetSpec

PERSISTENT_CLIENT_EXPIRATION = "7d"
AUTOSAVE_INTERVAL_S = 300


def conf_text(spec: FleetSpec, limits: Limits) -> str:
    d = spec.broker_layout  # where the broker host keeps the files: every path absolute
    listener = f"listener {spec.port}" + (f" {spec.bind}" if spec.bind else "")
    lines = [
        f"# mosquitto.conf for fleetlearn fleet {spec.fleet!r}, written by `fleetlearn broker-config`.",
        f"# Run: mosquitto -c {d.mosquitto_conf}    (mosquitto 2.0 or newer)",
        "# Run as root, mosquitto drops to the `mosquitto` user right after reading this file, before",
        "# it reads the files below: that user must be able to read them (and write data/).",
        "",
        "# ---- global settings: mosquitto 2.0 applies these to every listener",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d.passwd}",
        f"acl_file {d.acl}",
    ]
    if spec.run_as:
        lines.append(f"user {spec.run_as}")
    lines += [
        "",
        "# Largest payload accepted: the biggest legitimate message (a global model or update frame,",
        "# a bundle chunk, the bundle announcement) plus headroom. Larger publishes are dropped.",
        f"message_size_limit {limits.message_size_limit}",
        "# Whole packets far above that are hostile: the sender is disconnected before the broker",
        "# buffers the packet (message_size_limit alone reads the whole packet into memory first).",
        f"max_packet_size {limits.max_packet_size}",
        "# Per-client queue beyond the in-flight window. mosquitto's default (1000 messages of any",
        "# size, no byte bound) lets one stalled subscriber pin ~1000 models' worth of memory.",
        f"max_queued_messages {limits.max_queued_messages}",
        f"max_queued_bytes {limits.max_queued_bytes}",
        f"max_inflight_messages {limits.max_inflight_messages}",
        "queue_qos0_messages false",
        "# A device that never comes back must not keep a session (and its queue) forever.",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        "# Without it, Nagle's algorithm plus delayed ACKs add ~40 ms to every small message's trip.",
        "set_tcp_nodelay true",
        "",
        "# Retained state (global model, round, bundle) and the aggregator's queued updates survive",
        "# a broker restart.",
        "persistence true",
        f"persistence_location {d.data}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        "",
        "# ---- the listener: the settings after it apply to it alone",
        listener,
        f"max_connections {limits.max_connections}",
        "# The client id is the user name: a device cannot take over (disconnect) another's session",
        "# by connecting with its client id.",
        "use_username_as_clientid true",
    ]
    lines += _tls(spec)
    lines += [
        "",
        "# ---- the service listener: the aggregator and the monitor (loopback unless --service-bind)",
        "# Client ids are the clients' own here: an aggregator holds two connections (the fleet's",
        "# leader lease has its own, with a Last Will) and two aggregators of one fleet must never",
        "# share an id, or each would disconnect the other. Devices connect to the listener above.",
        f"listener {spec.service_listener_port} {spec.service_bind}",
        f"max_connections {SERVICE_MAX_CONNECTIONS}",
    ]
    lines += _tls(spec)
    return "\n".join(lines) + "\n"


SERVICE_MAX_CONNECTIONS = 64  # aggregators (3 connections each while claiming), monitors, operators' tools


def _tls(spec: FleetSpec) -> list[str]:
    if not spec.tls:
        return []
    d = spec.broker_layout
    return [
        f"cafile {d.ca_cert}",
        f"certfile {d.server_cert}",
        f"keyfile {d.server_key}",
        "# Clients authenticate with user name and password; TLS authenticates the broker.",
        "require_certificate false",
        "tls_version tlsv1.2",
    ]

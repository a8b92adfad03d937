"""Write a secured mosquitto (2.0+) configuration for one fleet.

    fleetlearn broker-config --fleet F --devices dev-0,dev-1 --out DIR [--tls]
        (--bundle BUNDLE | --max-model-params N) [--host broker.example.com] [--port P]

DIR afterwards holds:

    mosquitto.conf                 limits, persistence, one listener; every path in it absolute
    passwd                         PBKDF2-SHA512 ($7$) hashes: every device, the aggregator, [monitor]
    acl                            one `user` block per client: each may touch only its own topics
    ca.crt, server.crt, server.key with --tls: a CA made for this fleet and the broker's certificate
    ca.key                         with --tls: the CA's private key; stays with the operator
    devices/<id>/mqtt-password     each device's password (what `fleetlearn flash --credentials` reads)
    aggregator/mqtt-password       the aggregator's password (`fleetlearn aggregator --password-file`)
    monitor/mqtt-password          with --monitor: a read-only user for `fleetlearn monitor`
    devices/<id>/signing.key|.pub  with --signing-keys: each device's Ed25519 key pair (docs/security-signing.md)
    aggregator/signing.key|.pub    with --signing-keys: the aggregator's key pair (signs global models)
    aggregator/device-keys/<id>.pub  with --signing-keys: every device's public key (`aggregator --device-keys`)
    data/                          the broker's persistence directory
    README.md                      which file goes where

The password file is written in pure Python (the `$7$` format mosquitto 2.0's own
mosquitto_passwd writes), so an operator without mosquitto installed can run this; the file
stays editable with `mosquitto_passwd`. Why each limit and ACL line exists is in
docs/security-broker.md and in comments inside the files written.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fleetlearn.edge_runtime.core.errors import UsageError

DEFAULT_CHUNK_SIZE = 256 * 1024  # the aggregator's default --chunk-size
MONITOR_USER = "monitor"

# Sizes of the wire protocol (edge_runtime/protocol.py), repeated here as plain numbers so
# that `--help` imports nothing heavy; tests check they agree with the protocol module.
FRAME_HEADER_BYTES = 24
FRAME_MAX_META_BYTES = 8 * 1024
FRAME_MAX_SIG_BYTES = 512
MAX_JSON_BYTES = 64 * 1024  # round state, ack, status, metrics

HEADROOM_BYTES = 64 * 1024  # slack above the largest legitimate payload (a longer meta, a new field)
# max_packet_size counts the whole PUBLISH packet: fixed header (<=5), topic (<=2+65535), packet
# id, MQTT 5 properties. Above the payload limit by this much, a packet is no longer "a slightly
# too large message" but hostile: the broker disconnects the sender before buffering it.
PACKET_OVERHEAD_BYTES = 64 * 1024 + 1024
MQTT_MAX_PAYLOAD = 268_435_455 - PACKET_OVERHEAD_BYTES
MAX_MODEL_PARAMS = 1 << 26  # devices refuse larger global models (GlobalModel.decode max_params)

# Without --bundle the bundle's size is a guess: model.onnx, the training graph's checkpoint and
# graphs hold about two copies of the float32 weights; 12 bytes a parameter plus 1 MiB of graph
# is generous (the boston-mlp bundle is 25.6 kB for 1657 parameters: 15.5 B/param, mostly graph).
EST_BUNDLE_BYTES_PER_PARAM = 12
EST_BUNDLE_GRAPH_BYTES = 1 << 20

CONTROL_MESSAGES = 100  # round/metrics/ack/status messages on top of the model traffic
CONTROL_BYTES = 1 << 20
MAX_INFLIGHT_MESSAGES = 20  # mosquitto's default, stated so nobody "tunes" it to 0 (no limit)
PERSISTENT_CLIENT_EXPIRATION = "7d"
AUTOSAVE_INTERVAL_S = 300

# mosquitto_passwd 2.0's own choice. The passwords are 32 random bytes (secrets.token_urlsafe),
# so key stretching adds nothing against guessing, while every connect pays for it: a fleet's
# reconnect storm after a broker restart would burn CPU on a large count.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12

CA_DAYS = 3650
SERVER_CERT_DAYS = 825
CLOCK_SKEW_DAYS = 1  # certificates start a day early: device clocks before NTP sync are often behind

DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class BrokerConfigError(UsageError):
    """Bad input to broker-config; printed as one line, exit 2."""


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelSize:
    """What the limits are sized from: the model, and the bundle devices fetch over MQTT."""

    num_params: int
    chunk_size: int
    bundle_bytes: int  # total bytes of the bundle's files (estimated without --bundle)
    announcement_bytes: int  # the retained bundle announcement (JSON with the manifest)
    measured: bool  # True when read from a bundle, False when estimated from --max-model-params


@dataclass(frozen=True)
class FleetSpec:
    fleet: str
    devices: tuple[str, ...]
    aggregator_user: str
    monitor: bool
    out: Path  # absolute
    broker_dir: Path  # absolute: where the broker reads its files (the paths in mosquitto.conf)
    tls: bool
    hosts: tuple[str, ...]  # certificate names: DNS names and IP addresses
    port: int
    bind: str | None
    run_as: str | None
    force: bool
    signing_keys: bool = False  # also Ed25519 key pairs for update signing


@dataclass(frozen=True)
class Limits:
    message_size_limit: int
    max_packet_size: int
    max_queued_messages: int
    max_queued_bytes: int
    max_inflight_messages: int
    max_connections: int


@dataclass(frozen=True)
class Credential:
    username: str
    password: str
    role_dir: str  # where its plaintext goes inside DIR: "devices/<id>", "aggregator", "monitor"


# ---------------------------------------------------------------- argument checks


def _check_name(value: str, what: str) -> str:
    from fleetlearn.edge_runtime.core.names import check_name
    from fleetlearn.edge_runtime.core.errors import ConfigError

    try:
        return check_name(value, what)
    except ConfigError as exc:
        raise BrokerConfigError(str(exc)) from None


def parse_devices(text: str, reserved: Iterable[str]) -> tuple[str, ...]:
    """Comma-separated device ids: each safe in a topic and a file name, unique, not a service user."""
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ids:
        raise BrokerConfigError("--devices needs at least one device id (comma-separated)")
    seen: set[str] = set()
    reserved = set(reserved)
    for device in ids:
        _check_name(device, "device id")
        if device in seen:
            raise BrokerConfigError(f"device id {device!r} is listed twice in --devices")
        if device in reserved:
            raise BrokerConfigError(f"device id {device!r} is the name of a service user ({', '.join(sorted(reserved))}); rename the device")
        seen.add(device)
    return ids


def parse_hosts(text: str) -> tuple[str, ...]:
    """Comma-separated names the broker is reached by: DNS names or IP addresses."""
    hosts = tuple(part.strip() for part in text.split(",") if part.strip())
    if not hosts:
        raise BrokerConfigError("--host needs a host name or address")
    for host in hosts:
        if not (_is_ip(host) or DNS_RE.fullmatch(host)):
            raise BrokerConfigError(f"--host {host!r} is neither a DNS name nor an IP address")
    return hosts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def spec_from_args(args: argparse.Namespace) -> FleetSpec:
    fleet = _check_name(args.fleet, "fleet name")
    aggregator_user = _check_name(args.aggregator_user, "--aggregator-user")
    if aggregator_user == MONITOR_USER:
        raise BrokerConfigError(f"--aggregator-user {MONITOR_USER!r} is the monitor's user name; choose another")
    devices = parse_devices(args.devices, reserved=(aggregator_user, MONITOR_USER))
    port = args.port if args.port is not None else (8883 if args.tls else 1883)
    if not 1 <= port <= 65535:
        raise BrokerConfigError(f"--port {port} is not a TCP port (1-65535)")
    out = Path(args.out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BrokerConfigError(f"--out {out} exists and is not a directory")
    if out.exists() and not args.force:
        raise BrokerConfigError(f"--out {out} already exists; pass --force to replace it (new passwords, and a new CA with --tls)")
    broker_dir = Path(args.broker_dir).absolute() if args.broker_dir else out
    for option, path in (("--out", out), ("--broker-dir", broker_dir)):
        if re.search(r"[\x00-\x1f\x7f]", str(path)):
            # One mosquitto.conf line per value: a newline in a path would smuggle in a directive.
            raise BrokerConfigError(f"{option} {str(path)!r} contains a control character (newline, tab...)")
    if args.bind is not None and not (_is_ip(args.bind) or DNS_RE.fullmatch(args.bind)):
        raise BrokerConfigError(f"--bind {args.bind!r} is neither an IP address nor a host name")
    if args.run_as is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", args.run_as):
        raise BrokerConfigError(f"--run-as {args.run_as!r} is not a user name")
    return FleetSpec(
        fleet=fleet,
        devices=devices,
        aggregator_user=aggregator_user,
        monitor=args.monitor,
        out=out,
        broker_dir=broker_dir,
        tls=args.tls,
        hosts=parse_hosts(args.host),
        port=port,
        bind=args.bind,
        run_as=args.run_as,
        force=args.force,
        signing_keys=getattr(args, "signing_keys", False),
    )


# ---------------------------------------------------------------- sizes and limits


def model_frame_bytes(num_params: int) -> int:
    """Largest GLOBAL or UPDATE frame of a model: header + meta bound + float32 body + signature bound."""
    return FRAME_HEADER_BYTES + FRAME_MAX_META_BYTES + 4 * num_params + FRAME_MAX_SIG_BYTES


def chunk_frame_bytes(chunk_size: int) -> int:
    """Largest BUNDLE_CHUNK frame (chunks are never signed)."""
    return FRAME_HEADER_BYTES + FRAME_MAX_META_BYTES + chunk_size


def size_from_params(num_params: int, chunk_size: int) -> ModelSize:
    if not 1 <= num_params <= MAX_MODEL_PARAMS:
        raise BrokerConfigError(f"--max-model-params {num_params} must be between 1 and {MAX_MODEL_PARAMS} (what devices accept)")
    estimate = EST_BUNDLE_BYTES_PER_PARAM * num_params + EST_BUNDLE_GRAPH_BYTES
    return ModelSize(num_params, chunk_size, estimate, MAX_JSON_BYTES, measured=False)


def size_from_bundle(bundle_dir: Path, chunk_size: int) -> ModelSize:
    """Exact sizes from an exported bundle: num_params, file bytes, the announcement's length."""
    from fleetlearn.aggregator.distribution import plan_bundle
    from fleetlearn.edge_runtime.core.bundle import load_bundle

    if not Path(bundle_dir).is_dir():
        raise BrokerConfigError(f"--bundle {bundle_dir}: not a directory")
    manifest = load_bundle(bundle_dir)  # BundleError is a UsageError: one line, exit 2
    plan = plan_bundle(bundle_dir, manifest, chunk_size)
    a = plan.announcement
    return ModelSize(manifest.num_params, chunk_size, a.total_bytes, len(a.encode()), measured=True)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def compute_limits(size: ModelSize, n_devices: int) -> Limits:
    """Broker limits for a fleet: every legitimate message passes, nothing else is unbounded.

    mosquitto 2.0 has one value per limit for all clients, so each is the largest any one
    client legitimately needs:
      * the aggregator (and a monitor) get one update per device per round, all at once;
      * a device fetching the bundle gets every retained chunk at once, plus a global model or two.
    """
    frame = model_frame_bytes(size.num_params)
    chunk = chunk_frame_bytes(size.chunk_size)
    largest = max(frame, chunk, size.announcement_bytes, MAX_JSON_BYTES)
    message_limit = _round_up(largest + HEADROOM_BYTES, 4096)
    if message_limit > MQTT_MAX_PAYLOAD:
        raise BrokerConfigError(f"a {size.num_params}-parameter model needs {message_limit}-byte messages, over MQTT's limit; use a smaller model")
    chunks = math.ceil(size.bundle_bytes / size.chunk_size)
    # Monitor: an update, a status and an ack per device per round; device: every chunk.
    queued_messages = max(3 * n_devices, chunks + 4) + CONTROL_MESSAGES
    queued_bytes = max(n_devices * frame, chunks * chunk + 2 * frame, 2 * message_limit) + CONTROL_BYTES
    return Limits(
        message_size_limit=message_limit,
        max_packet_size=message_limit + PACKET_OVERHEAD_BYTES,
        max_queued_messages=queued_messages,
        max_queued_bytes=_round_up(queued_bytes, 1 << 20),
        max_inflight_messages=MAX_INFLIGHT_MESSAGES,
        # Each client once, plus as many again for reconnects racing their old socket's
        # timeout, plus some for operators' tools: a flood of half-open sockets stops here.
        max_connections=2 * (n_devices + 2) + 32,
    )


# ---------------------------------------------------------------- passwords


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto 2.0's `$7$` password hash: PBKDF2-HMAC-SHA512, base64 salt and 64-byte digest."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def make_credentials(spec: FleetSpec) -> list[Credential]:
    creds = [Credential(spec.aggregator_user, new_password(), "aggregator")]
    if spec.monitor:
        creds.append(Credential(MONITOR_USER, new_password(), "monitor"))
    creds += [Credential(d, new_password(), f"devices/{d}") for d in spec.devices]
    return creds


def password_file_text(creds: Iterable[Credential]) -> str:
    return "".join(f"{c.username}:{hash_password(c.password)}\n" for c in creds)


# ---------------------------------------------------------------- ACL


def acl_text(spec: FleetSpec) -> str:
    """One explicit `user` block per client. No `pattern` lines: a pattern applies to every user
    (the aggregator and the monitor too), which is easy to get wrong. No anonymous block: a
    client not listed here can neither publish nor receive anything, $SYS included."""
    base = f"fleetlearn/{spec.fleet}"
    lines = [
        f"# mosquitto ACL for fleetlearn fleet {spec.fleet!r}, written by `fleetlearn broker-config`.",
        "# mosquitto checks `write` when a client publishes (a Last Will included, when it fires) and",
        "# `read` for every message it would deliver: a subscription to a topic a client may not read",
        "# is granted but stays silent.",
        "",
        "# The aggregator owns the round: it alone publishes models, round state, metrics, the bundle",
        "# and acknowledgements, and it reads every update and device status.",
        f"user {spec.aggregator_user}",
        f"topic readwrite {base}/global",
        f"topic readwrite {base}/round",
        f"topic readwrite {base}/metrics",
        f"topic readwrite {base}/bundle",  # read too: it clears an older run's retained chunks
        f"topic readwrite {base}/bundle/#",
        f"topic write {base}/ack/+",
        f"topic read {base}/update/+",
        f"topic read {base}/status/+",
        "",
    ]
    if spec.monitor:
        lines += ["# Read-only view of the whole fleet for `fleetlearn monitor`.", f"user {MONITOR_USER}", f"topic read {base}/#", ""]
    lines.append("# Each device publishes only its own update and status, and reads the fleet's shared state and its own acks.")
    for device in spec.devices:
        lines += [
            f"user {device}",
            f"topic write {base}/update/{device}",
            f"topic write {base}/status/{device}",
            f"topic read {base}/global",
            f"topic read {base}/round",
            f"topic read {base}/metrics",
            f"topic read {base}/bundle",
            f"topic read {base}/bundle/#",
            f"topic read {base}/ack/{device}",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- mosquitto.conf


def conf_text(spec: FleetSpec, limits: Limits) -> str:
    d = spec.broker_dir
    listener = f"listener {spec.port}" + (f" {spec.bind}" if spec.bind else "")
    lines = [
        f"# mosquitto.conf for fleetlearn fleet {spec.fleet!r}, written by `fleetlearn broker-config`.",
        f"# Run: mosquitto -c {d / 'mosquitto.conf'}    (mosquitto 2.0 or newer)",
        "# Run as root, mosquitto drops to the `mosquitto` user right after reading this file, before",
        "# it reads the files below: that user must be able to read them (and write data/).",
        "",
        "# ---- global settings: mosquitto 2.0 applies these to every listener",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
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
        f"persistence_location {d / 'data'}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        "",
        "# ---- the listener: the settings after it apply to it alone",
        listener,
        f"max_connections {limits.max_connections}",
        "# The client id is the user name: a device cannot take over (disconnect) another's session",
        "# by connecting with its client id.",
        "use_username_as_clientid true",
    ]
    if spec.tls:
        lines += [
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'server.crt'}",
            f"keyfile {d / 'server.key'}",
            "# Clients authenticate with user name and password; TLS authenticates the broker.",
            "require_certificate false",
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes


def make_tls_files(fleet: str, hosts: tuple[str, ...]) -> TlsFiles:
    """A P-256 CA for this fleet and a server certificate it signs (SANs: hosts + 127.0.0.1).

    ECDSA P-256 rather than Ed25519: every OpenSSL 1.1+/3 mosquitto and every Python `ssl`
    (paho) accepts P-256 server certificates; Ed25519 ones are not universally supported by TLS stacks."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise BrokerConfigError("--tls needs the `cryptography` package: pip install 'fleetlearn[server]'") from None
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, fleet)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts)
    return TlsFiles(_cert_pem(ca_cert), _key_pem(ca_key), _cert_pem(server_cert), _key_pem(server_key))


def _validity(days: int):
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(days=CLOCK_SKEW_DAYS), now + dt.timedelta(days=days)


def _ca_certificate(key, fleet: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetlearn"), x509.NameAttribute(NameOID.COMMON_NAME, f"fleetlearn {fleet} CA")])
    start, end = _validity(CA_DAYS)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs broker certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(key, ca_key, ca_cert, hosts: tuple[str, ...]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    sans: list[x509.GeneralName] = []
    for host in (*hosts, "127.0.0.1"):
        entry = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
        if entry not in sans:
            sans.append(entry)
    start, end = _validity(SERVER_CERT_DAYS)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(ca: bool):
    """A CA signs certificates (and CRLs); an ECDSA server key only signs the TLS handshake."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# ---------------------------------------------------------------- README


def readme_text(spec: FleetSpec, limits: Limits, size: ModelSize) -> str:
    d, out = spec.broker_dir, spec.out
    scheme = "mqtts" if spec.tls else "mqtt"
    url = f"{scheme}://{spec.hosts[0]}:{spec.port}"
    broker_files = ["mosquitto.conf", "passwd", "acl", "data/"] + (["ca.crt", "server.crt", "server.key"] if spec.tls else [])
    first = spec.devices[0]
    lines = [
        f"# Broker credentials for fleetlearn fleet `{spec.fleet}`",
        "",
        "Written by `fleetlearn broker-config`; docs/security-broker.md explains every line.",
        "",
    ]
    if spec.tls:
        lines += [
            "## ca.key stays with the operator",
            "",
            "`ca.key` is the private key of this fleet's CA. Whoever has it can mint a certificate",
            "every device trusts as its broker. Keep it on the operator's machine (offline storage",
            "is better); **never copy it to a broker or a device**. It is needed only to sign a new",
            "`server.crt` (new host name, expiry). Devices and the aggregator need `ca.crt` only.",
            "",
        ]
    else:
        lines += [
            "## Plain TCP",
            "",
            "Without --tls, passwords and model weights cross the network in the clear: use this only on",
            "loopback or a network you trust, and regenerate with --tls for anything else.",
            "",
        ]
    lines += [
        "## What goes where",
        "",
        f"* broker ({d}): {', '.join(f'`{f}`' for f in broker_files)}. The paths inside",
        "  `mosquitto.conf` point there. Started as root, mosquitto drops to the `mosquitto` user",
        "  right after reading `mosquitto.conf`, so that user must be able to read the other files",
        "  and write `data/` (which will hold retained global models: keep it private).",
        "* aggregator: `aggregator/mqtt-password`" + (" and `ca.crt`." if spec.tls else "."),
        "* each device: its own `devices/<id>/mqtt-password`" + (" and `ca.crt`" if spec.tls else "")
        + "; `fleetlearn flash --credentials DIR` copies exactly those, never another device's.",
    ]
    if spec.monitor:
        lines.append("* monitor: `monitor/mqtt-password` (read-only user `monitor`).")
    if spec.signing_keys:
        lines += [
            "* update signing: the aggregator takes `--signing-key aggregator/signing.key --device-keys aggregator/device-keys`;",
            "  flash copies `devices/<id>/signing.key` and `aggregator/signing.pub` into each image. Delete",
            "  `devices/*/signing.key` once the devices are flashed (docs/security-signing.md).",
        ]
    lines += [
        "",
        "## Run",
        "",
        "```",
        f"mosquitto -c {d / 'mosquitto.conf'}",
        f"fleetlearn aggregator --broker {url} --fleet {spec.fleet} --username {spec.aggregator_user} \\",
        f"    --password-file {out / 'aggregator' / 'mqtt-password'}" + (f" --ca-file {out / 'ca.crt'}" if spec.tls else "") + " \\",
        "    --bundle BUNDLE --rounds R --min-devices N --state-dir STATE",
        "```",
        "",
        f"Device config (`{first}`):",
        "",
        "```toml",
        f'broker = "{url}"',
        'mqtt_protocol = "5"   # the broker then answers a denied publish with 0x87 instead of dropping it silently',
        "[auth]",
        f'username = "{first}"',
        'password_file = "secrets/mqtt-password"',
    ]
    if spec.tls:
        lines += ["[tls]", 'ca_file = "secrets/ca.crt"']
    lines += [
        "```",
        "",
        "## Limits",
        "",
        f"Sized for {len(spec.devices)} devices and a {size.num_params}-parameter model"
        + (" (measured from the bundle)." if size.measured else " (bundle size estimated; pass --bundle to measure it)."),
        f"message_size_limit is {limits.message_size_limit} bytes and max_queued_bytes {limits.max_queued_bytes}:",
        "a bigger model or fleet needs larger values (edit them and restart mosquitto, or regenerate).",
        "Rotating one device's password without touching the others: docs/security-broker.md.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- writing


def write_file(path: Path, data: str | bytes, mode: int) -> None:
    """Create `path` with `mode` from the first byte (never briefly world-readable)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)  # the umask may have narrowed it; make it exactly `mode`


def _private_dirs(path: Path) -> None:
    """mkdir -p with 0700 on every level created (pathlib gives `mode` to the leaf only)."""
    if path.is_dir():
        return
    _private_dirs(path.parent)
    path.mkdir(mode=0o700)


def write_tree(root: Path, spec: FleetSpec, limits: Limits, size: ModelSize) -> None:
    """Everything into `root` (a fresh temporary directory)."""
    creds = make_credentials(spec)
    for cred in creds:
        write_file(root / cred.role_dir / "mqtt-password", cred.password + "\n", 0o600)
    write_file(root / "passwd", password_file_text(creds), 0o600)
    write_file(root / "acl", acl_text(spec), 0o600)
    write_file(root / "mosquitto.conf", conf_text(spec, limits), 0o644)
    if spec.tls:
        tls = make_tls_files(spec.fleet, spec.hosts)
        write_file(root / "ca.crt", tls.ca_cert, 0o644)
        write_file(root / "ca.key", tls.ca_key, 0o600)
        write_file(root / "server.crt", tls.server_cert, 0o644)
        write_file(root / "server.key", tls.server_key, 0o600)
    if spec.signing_keys:
        from fleetlearn.aggregator.signing import write_fleet_signing_keys

        write_fleet_signing_keys(root, spec.devices, write_file)
    (root / "data").mkdir(mode=0o700)
    write_file(root / "README.md", readme_text(spec, limits, size), 0o644)


def install_tree(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; with `force`, the old `out` is moved aside first and
    removed only once the new one is in place."""
    old: Path | None = None
    if out.exists():
        if not force:  # appeared while we were writing
            raise BrokerConfigError(f"--out {out} already exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(spec: FleetSpec, limits: Limits, size: ModelSize) -> None:
    """Write into a temporary directory beside `out`, then rename: a failure leaves no half-written `out`."""
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.tmp-", dir=spec.out.parent))
    try:
        write_tree(tmp, spec, limits, size)
        install_tree(tmp, spec.out, spec.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the file list in the docstring readable
    parser.add_argument("--fleet", required=True, help="fleet name (the topics' fleetlearn/<fleet>/...)")
    parser.add_argument("--devices", required=True, help="comma-separated device ids, e.g. dev-0,dev-1")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (must not exist unless --force)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--bundle", type=Path, help="exported bundle: size the limits from its manifest and files")
    size.add_argument("--max-model-params", type=int, help="size the limits for a model of up to N parameters")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"the aggregator's --chunk-size (default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--tls", action="store_true", help="TLS listener with a CA made for this fleet")
    parser.add_argument("--host", default="localhost", help="name(s) clients use for the broker, comma-separated, in the server certificate (default localhost; 127.0.0.1 is always added)")
    parser.add_argument("--port", type=int, help="listener port (default 8883 with --tls, else 1883)")
    parser.add_argument("--bind", help="listen on this address only (default: every interface)")
    parser.add_argument("--aggregator-user", default="aggregator", help="the aggregator's MQTT user name (default aggregator)")
    parser.add_argument("--monitor", action="store_true", help=f"also a read-only user {MONITOR_USER!r} for `fleetlearn monitor`")
    parser.add_argument("--broker-dir", type=Path, help="where the broker host keeps these files, for the paths in mosquitto.conf (default: --out)")
    parser.add_argument("--run-as", help="mosquitto's `user` option: the account it drops to when started as root (default: mosquitto's own, `mosquitto`)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (every password and, with --tls, the CA change)")
    parser.add_argument("--signing-keys", action="store_true", help="also make Ed25519 update-signing key pairs for every device and the aggregator (docs/security-signing.md)")


def run(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator.distribution import check_chunk_size

    spec = spec_from_args(args)
    check_chunk_size(args.chunk_size)
    size = size_from_bundle(args.bundle, args.chunk_size) if args.bundle is not None else size_from_params(args.max_model_params, args.chunk_size)
    limits = compute_limits(size, len(spec.devices))
    build(spec, limits, size)
    print(
        f"wrote {spec.out}: {len(spec.devices)} devices, user {spec.aggregator_user}"
        + (f", user {MONITOR_USER}" if spec.monitor else "")
        + (", TLS" if spec.tls else ", plain TCP")
        + f", port {spec.port}, message_size_limit {limits.message_size_limit}"
    )
    if spec.tls:
        print(f"keep {spec.out / 'ca.key'} with the operator: never copy it to a broker or a device")
    return 0

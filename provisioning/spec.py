"""What broker-config is asked to provision, checked: the fleet, its devices, users, listener.

Every check answers bad input with a one-line BrokerConfigError (exit 2) naming the option.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.provisioning.errors import BrokerConfigError
from fleetlearn.provisioning.layout import CredentialsLayout

MONITOR_USER = "monitor"
DNS_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


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
    # The service listener (aggregator, monitor): client ids are the clients' own there, since an
    # aggregator holds two connections (its fleet lease) and two aggregators must not share one.
    service_port: int = 0  # 0: --port + 1
    service_bind: str = "127.0.0.1"
    fleetlearn_command: str = ""  # what the aggregator's systemd unit runs ("" : this Python's -m fleetlearn.cli)
    mosquitto_binary: str = "/usr/sbin/mosquitto"

    @property
    def service_listener_port(self) -> int:
        return self.service_port or self.port + 1

    @property
    def layout(self) -> CredentialsLayout:
        """The credentials directory as written (--out)."""
        return CredentialsLayout(self.out)

    @property
    def broker_layout(self) -> CredentialsLayout:
        """The same files where the broker host keeps them (--broker-dir): mosquitto.conf's paths."""
        return CredentialsLayout(self.broker_dir)


# ---------------------------------------------------------------- argument checks


def _check_name(value: str, what: str) -> str:
    from fleetlearn.edge_runtime.core.errors import ConfigError
    from fleetlearn.edge_runtime.core.names import check_name

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
            raise BrokerConfigError(
                f"device id {device!r} is the name of a service user ({', '.join(sorted(reserved))}); rename the device"
            )
        seen.add(device)
    return ids


def parse_hosts(text: str) -> tuple[str, ...]:
    """Comma-separated names the broker is reached by: DNS names or IP addresses."""
    hosts = tuple(part.strip() for part in text.split(",") if part.strip())
    if not hosts:
        raise BrokerConfigError("--host needs a host name or address")
    for host in hosts:
        if not (is_ip(host) or DNS_RE.fullmatch(host)):
            raise BrokerConfigError(f"--host {host!r} is neither a DNS name nor an IP address")
    return hosts


def is_ip(text: str) -> bool:
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
        raise BrokerConfigError(
            f"--out {out} already exists; pass --force to replace it (new passwords, and a new CA with --tls)"
        )
    broker_dir = Path(args.broker_dir).absolute() if args.broker_dir else out
    for option, path in (("--out", out), ("--broker-dir", broker_dir)):
        if re.search(r"[\x00-\x1f\x7f]", str(path)):
            # One mosquitto.conf line per value: a newline in a path would smuggle in a directive.
            raise BrokerConfigError(f"{option} {str(path)!r} contains a control character (newline, tab...)")
    if args.bind is not None and not (is_ip(args.bind) or DNS_RE.fullmatch(args.bind)):
        raise BrokerConfigError(f"--bind {args.bind!r} is neither an IP address nor a host name")
    service_port = getattr(args, "service_port", None) or port + 1
    if not 1 <= service_port <= 65535 or service_port == port:
        raise BrokerConfigError(f"--service-port {service_port} must be a TCP port (1-65535) other than --port {port}")
    service_bind = getattr(args, "service_bind", None) or "127.0.0.1"
    if not (is_ip(service_bind) or DNS_RE.fullmatch(service_bind)):
        raise BrokerConfigError(f"--service-bind {service_bind!r} is neither an IP address nor a host name")
    command = getattr(args, "fleetlearn_command", None) or ""
    if re.search(r"[\x00-\x1f\x7f%$\\]", command) or (command and not command.startswith("/")):
        raise BrokerConfigError(
            f"--fleetlearn-command {command!r} must start with an absolute path and hold no control characters, '%', '$' or '\\'"
        )
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
        service_port=service_port,
        service_bind=service_bind,
        fleetlearn_command=command,
        mosquitto_binary=_mosquitto_binary(),
    )


def _mosquitto_binary() -> str:
    import shutil

    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"

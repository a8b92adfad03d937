"""systemd units for a fleet's broker host: mosquitto and the aggregator, hardened like the
device unit (firmware_configs/templates/fleetlearn-device.service).

    systemd/fleetlearn-mosquitto-<fleet>.service    mosquitto -c <broker-dir>/mosquitto.conf
    systemd/fleetlearn-aggregator-<fleet>.service   fleetlearn aggregator on the service listener

Install: copy both to /etc/systemd/system/, `systemctl daemon-reload`, then
`systemctl enable --now fleetlearn-mosquitto-<fleet> fleetlearn-aggregator-<fleet>`. The
aggregator's run (bundle, rounds, strategy, --metrics-port) is `FLEETLEARN_AGGREGATOR_ARGS`:
override it with `systemctl edit fleetlearn-aggregator-<fleet>`. Its state dir is systemd's
StateDirectory (/var/lib/fleetlearn/<fleet>), its MQTT password reaches it through
LoadCredential (the file stays root's, 0600). docs/operations-service.md has the details.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.spec import FleetSpec

# Shared by both units: what neither a broker nor an aggregator needs.
HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# AF_NETLINK: glibc's getaddrinfo may ask the kernel for the interface addresses.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0077"""


def unit_names(fleet: str) -> tuple[str, str]:
    layout = CredentialsLayout(Path("."))
    return layout.mosquitto_unit(fleet).name, layout.aggregator_unit(fleet).name


def mosquitto_unit(spec: FleetSpec) -> str:
    d = spec.broker_layout
    return f"""\
# mosquitto for fleetlearn fleet '{spec.fleet}', written by `fleetlearn broker-config`.
[Unit]
Description=MQTT broker for fleetlearn fleet {spec.fleet}
Documentation=man:mosquitto(8) file://{d.readme}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=mosquitto
Group=mosquitto
ExecStart={spec.mosquitto_binary} -c {d.mosquitto_conf}
# SIGHUP re-reads the password and ACL files (a rotated device password, docs/security-broker.md).
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
StandardOutput=journal
StandardError=journal
SyslogIdentifier=fleetlearn-mosquitto-{spec.fleet}
LimitNOFILE=65536

# Hardening: the broker reads its directory and writes its persistence (retained models) only.
{HARDENING}
ReadOnlyPaths={d.root}
ReadWritePaths={d.data}

[Install]
WantedBy=multi-user.target
"""


def aggregator_unit(spec: FleetSpec) -> str:
    d = spec.broker_layout
    mosquitto, _ = unit_names(spec.fleet)
    scheme = "mqtts" if spec.tls else "mqtt"
    # 127.0.0.1 is in every server certificate broker-config makes.
    host = "127.0.0.1" if spec.service_bind in ("127.0.0.1", "0.0.0.0", "::") else spec.service_bind
    command = spec.fleetlearn_command or f"{sys.executable} -m fleetlearn.cli"
    ca = " --ca-file ${CREDENTIALS_DIRECTORY}/ca.crt" if spec.tls else ""
    ca_credential = f"LoadCredential=ca.crt:{d.ca_cert}\n" if spec.tls else ""
    return f"""\
# fleetlearn aggregator for fleet '{spec.fleet}', written by `fleetlearn broker-config`.
# The run itself (bundle, rounds, strategy, metrics) is FLEETLEARN_AGGREGATOR_ARGS below:
# change it with `systemctl edit fleetlearn-aggregator-{spec.fleet}` ([Service] Environment=...).
[Unit]
Description=fleetlearn aggregator (fleet {spec.fleet})
Documentation=file://{d.readme}
Wants=network-online.target {mosquitto}
After=network-online.target {mosquitto}
StartLimitIntervalSec=0

[Service]
Type=simple
DynamicUser=yes
# /var/lib/fleetlearn/{spec.fleet}: checkpoints, round log, the bundle it exports, the final model.
StateDirectory=fleetlearn/{spec.fleet}
StateDirectoryMode=0700
# The MQTT password stays root's (0600); systemd hands this service a private copy.
LoadCredential=mqtt-password:{d.aggregator_password}
{ca_credential}Environment="FLEETLEARN_AGGREGATOR_ARGS=--model boston-mlp --rounds 100 --min-devices 2 --metrics-port 9108"
ExecStart={command} aggregator --broker {scheme}://{host}:{spec.service_listener_port} --fleet {spec.fleet} \\
    --username {spec.aggregator_user} --password-file ${{CREDENTIALS_DIRECTORY}}/mqtt-password{ca} \\
    --state-dir ${{STATE_DIRECTORY}} $FLEETLEARN_AGGREGATOR_ARGS
# 0: every round closed (stay stopped). 2 is a usage error or the fleet led by another
# aggregator: retrying every 30 s makes this host a standby that starts once the fleet is
# released (a stopped leader, or its Last Will). 3: a round failed; 130/143: stopped.
Restart=on-failure
RestartSec=30
SuccessExitStatus=130 143
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier=fleetlearn-aggregator-{spec.fleet}

# Hardening: the aggregator needs the network and its state dir; nothing else.
{HARDENING}

[Install]
WantedBy=multi-user.target
"""


def systemd_units(spec: FleetSpec, layout: CredentialsLayout) -> dict[Path, str]:
    """Path in `layout` -> unit text."""
    return {layout.mosquitto_unit(spec.fleet): mosquitto_unit(spec), layout.aggregator_unit(spec.fleet): aggregator_unit(spec)}

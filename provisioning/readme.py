"""README.md of a credentials directory: which file goes where, and how to start everything."""

from __future__ import annotations

from fleetlearn.provisioning.limits import Limits, ModelSize
from fleetlearn.provisioning.spec import MONITOR_USER, FleetSpec


def readme_text(spec: FleetSpec, limits: Limits, size: ModelSize) -> str:
    d, out = spec.broker_layout, spec.layout
    rel = out.relative  # a file's name inside the directory, for the prose
    any_device = "<id>"
    scheme = "mqtts" if spec.tls else "mqtt"
    url = f"{scheme}://{spec.hosts[0]}:{spec.port}"
    service_url = f"{scheme}://{'127.0.0.1' if spec.service_bind in ('127.0.0.1', '0.0.0.0', '::') else spec.service_bind}:{spec.service_listener_port}"
    broker_files = [rel(out.mosquitto_conf), rel(out.passwd), rel(out.acl), rel(out.data) + "/"]
    broker_files += [rel(out.ca_cert), rel(out.server_cert), rel(out.server_key)] if spec.tls else []
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
        f"* broker ({d.root}): {', '.join(f'`{f}`' for f in broker_files)}. The paths inside",
        "  `mosquitto.conf` point there. Started as root, mosquitto drops to the `mosquitto` user",
        "  right after reading `mosquitto.conf`, so that user must be able to read the other files",
        "  and write `data/` (which will hold retained global models: keep it private).",
        f"* aggregator: `{rel(out.aggregator_password)}`" + (f" and `{rel(out.ca_cert)}`." if spec.tls else "."),
        f"* each device: its own `{rel(out.device_password(any_device))}`"
        + (f" and `{rel(out.ca_cert)}`" if spec.tls else "")
        + "; `fleetlearn flash --credentials DIR` copies exactly those, never another device's.",
    ]
    if spec.monitor:
        lines.append(f"* monitor: `{rel(out.monitor_password)}` (read-only user `{MONITOR_USER}`).")
    if spec.signing_keys:
        lines += [
            f"* update signing: the aggregator takes `--signing-key {rel(out.aggregator_signing_key)} --device-keys {rel(out.device_keys_dir)}`;",
            f"  flash copies `{rel(out.device_signing_key(any_device))}` and `{rel(out.aggregator_signing_pub)}` into each image. Delete",
            f"  `{rel(out.device_signing_key('*'))}` once the devices are flashed (docs/security-signing.md).",
        ]
    lines += [
        "",
        "## Run",
        "",
        "```",
        f"mosquitto -c {d.mosquitto_conf}",
        f"fleetlearn aggregator --broker {service_url} --fleet {spec.fleet} --username {spec.aggregator_user} \\",
        f"    --password-file {out.aggregator_password}" + (f" --ca-file {out.ca_cert}" if spec.tls else "") + " \\",
        "    --bundle BUNDLE --rounds R --min-devices N --state-dir STATE",
        "```",
        "",
        f"Devices use port {spec.port}. The aggregator and the monitor use the service listener on",
        f"{spec.service_bind}:{spec.service_listener_port}, where client ids are the clients' own (the aggregator holds a",
        "second connection for the fleet's leader lease; docs/operations-service.md).",
        "",
        "As services: `systemd/` holds hardened units for mosquitto and the aggregator; copy them",
        "to /etc/systemd/system/, `systemctl daemon-reload`, `systemctl enable --now` both.",
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

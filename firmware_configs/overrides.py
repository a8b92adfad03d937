"""Per-device `--set key=value` overrides on top of a profile.

A key names either a device config key (edge_runtime/config.py's DeviceConfig: `keepalive`,
`target`, `training.batch_size`, `tls.insecure_skip_hostname`, ...) or a systemd limit of the
profile (`systemd.memory_max`, ...). Values are converted by the schema's declared type, so
`mqtt_protocol=5` stays the string "5" and `training.threads=x` is an error naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fleetlearn.edge_runtime.device.config import DeviceConfig
from fleetlearn.firmware_configs.errors import FlashError
from fleetlearn.firmware_configs.profiles import SystemdLimits
from fleetlearn.firmware_configs.schema import base_type, check_value, field_types

# Set by their own flags (or derived from --credentials), so `--set` cannot contradict them.
FLAG_OWNED = {
    "device_id": "--device-id",
    "fleet": "--fleet",
    "broker": "--broker",
    "bundle": "--prefix (the bundle lives in PREFIX/bundle)",
    "data": "--data",
    "profile": "--profile",
    "auth": "--credentials",
    "auth.password_file": "--credentials",
    "auth.password": "--credentials (never put a password in device.toml)",
    "tls.ca_file": "--credentials",
    "signing.key_file": "--credentials or --new-signing-key",
    "signing.aggregator_public_key": "--credentials",
}


@dataclass(frozen=True)
class Overrides:
    config: dict[str, Any] = field(default_factory=dict)  # nested like the TOML: {"training": {"threads": 2}}
    systemd: dict[str, Any] = field(default_factory=dict)  # SystemdLimits field -> value


def _convert(annotation: Any, raw: str, key: str) -> Any:
    """The text after '=' converted to the key's declared type."""
    kind = field_types_base(annotation)
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise FlashError(f"--set {key}: must be true or false, got {raw!r}")
        value: Any = raw.lower() == "true"
    elif kind is int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise FlashError(f"--set {key}: must be an integer, got {raw!r}") from None
    else:
        value = raw
    return check_value(annotation, value, key)


def field_types_base(annotation: Any) -> Any:
    return base_type(annotation)[0]


def _config_annotation(key: str) -> Any:
    """The declared type of a (dotted) DeviceConfig key, or raise naming the known keys."""
    top = field_types(DeviceConfig)
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in top and not dataclasses.is_dataclass(field_types_base(top[parts[0]])):
        return top[parts[0]]
    if len(parts) == 2 and parts[0] in top and dataclasses.is_dataclass(field_types_base(top[parts[0]])):
        table = field_types(field_types_base(top[parts[0]]))
        if parts[1] in table:
            return table[parts[1]]
    raise FlashError(f"--set: unknown key {key!r} (known: {', '.join(known_keys())})")


def known_keys() -> list[str]:
    keys: list[str] = []
    for name, annotation in field_types(DeviceConfig).items():
        base = field_types_base(annotation)
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            keys += [f"{name}.{sub}" for sub in field_types(base)]
        else:
            keys.append(name)
    keys += [f"systemd.{f.name}" for f in dataclasses.fields(SystemdLimits)]
    return sorted(k for k in keys if k not in FLAG_OWNED)


def parse_overrides(items: list[str]) -> Overrides:
    """`["training.threads=2", "systemd.memory_max=512M"]` -> Overrides. Raises FlashError naming the key."""
    config: dict[str, Any] = {}
    systemd: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FlashError(f"--set {item!r}: expected key=value")
        if key in FLAG_OWNED:
            raise FlashError(f"--set {key}: set by {FLAG_OWNED[key]}, not by --set")
        if key.startswith("systemd."):
            name = key.split(".", 1)[1]
            hints = field_types(SystemdLimits)
            if name not in hints:
                raise FlashError(f"--set: unknown key {key!r} (known: {', '.join(known_keys())})")
            systemd[name] = _convert(hints[name], raw, key)
            continue
        value = _convert(_config_annotation(key), raw, key)
        if "." in key:
            table, sub = key.split(".", 1)
            config.setdefault(table, {})[sub] = value
        else:
            config[key] = value
    return Overrides(config, systemd)

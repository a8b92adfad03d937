"""The device config (TOML): what one device needs to join a fleet.

Strict on purpose: an unknown key or a value of the wrong type is an error that names the
key, because a typo in a file on a device in a field is otherwise found weeks later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.core.files import read_toml
from fleetlearn.edge_runtime.core.names import check_name
from fleetlearn.edge_runtime.device.eligibility import EligibilityConfig, parse_eligibility

ENGINE_CHOICES = ("auto", "ort-training", "portable")  # as engines/select.py (config must not import onnxruntime)


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8
    local_epochs: int = 1
    max_steps: int | None = None  # caps local steps per round (whichever comes first)
    threads: int = 1  # ORT intra-op threads
    seed: int = 0  # shuffling seed; mixed with the round id so each round sees a new order
    # "auto": onnxruntime-training when installed and in the bundle, else the portable engine
    # (plain onnxruntime); or force one: "ort-training" | "portable" (engines/select.py)
    engine: str = "auto"


@dataclass(frozen=True)
class AuthConfig:
    username: str | None = None
    password_file: str | None = None
    password: str | None = None  # prefer password_file; kept for tests and throwaway fleets

    def read_password(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"auth.password_file {self.password_file}: {exc.strerror}") from None
        return self.password


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (optional, for brokers that require one)
    key_file: str | None = None
    insecure_skip_hostname: bool = False


@dataclass(frozen=True)
class SigningConfig:
    key_file: str | None = None  # this device's Ed25519 private key (PEM), made at flash time
    aggregator_public_key: str | None = None  # to verify global models (PEM)


@dataclass(frozen=True)
class PrivacyConfig:
    """Local DP (edge_runtime/privacy.py): clip the delta to clip_norm, add N(0, (s*clip_norm)^2)."""

    clip_norm: float | None = None  # None: send the delta as trained
    local_noise_multiplier: float = 0.0  # s; 0: clip only


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    fleet: str
    broker: str
    bundle: str
    data: str
    state_dir: str
    target: str | None = None  # CSV target column name (default: the last column)
    mqtt_protocol: str = "3.1.1"  # or "5"
    keepalive: int = 30
    training: TrainingConfig = field(default_factory=TrainingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    profile: str | None = None  # the firmware profile this config was rendered from (informational)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)  # when it may train (device/eligibility.py)
    sysfs_root: str = "/sys"  # where health readings come from (tests point it at fake files)


_TABLES = {"training": TrainingConfig, "auth": AuthConfig, "tls": TlsConfig, "signing": SigningConfig, "privacy": PrivacyConfig}


def _typed(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check keys and value types of one table against a dataclass's annotated fields."""
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}{key}"
        if key not in known:
            raise ConfigError(f"unknown key {name!r} (known: {', '.join(sorted(known))})")
        if key == "eligibility":  # its own strict parser: time windows are not plain types
            out[key] = parse_eligibility(value)
            continue
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} must be a table")
            out[key] = _TABLES[key](**_typed(_TABLES[key], value, f"{name}."))
            continue
        annotation = str(known[key].type)
        if "int" in annotation and "str" not in annotation:
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "an integer"
        elif "float" in annotation:
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif "bool" in annotation:
            ok, kind = isinstance(value, bool), "true or false"
        else:
            ok, kind = isinstance(value, str), "a string"
        if not ok:
            raise ConfigError(f"key {name!r} must be {kind}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def parse_device_config(doc: Mapping[str, Any], base_dir: Path | None = None) -> DeviceConfig:
    """Validate a decoded TOML document. Relative paths are taken relative to `base_dir`."""
    values = _typed(DeviceConfig, doc, "")
    for required in ("device_id", "fleet", "broker", "bundle", "data", "state_dir"):
        if required not in values:
            raise ConfigError(f"missing required key {required!r}")
    check_name(values["device_id"], "device_id")
    check_name(values["fleet"], "fleet")
    if not re.match(r"^mqtts?://", values["broker"]):
        raise ConfigError(f"key 'broker' must be an mqtt:// or mqtts:// URL, got {values['broker']!r}")
    if values.get("mqtt_protocol", "3.1.1") not in ("3.1.1", "5"):
        raise ConfigError('key \'mqtt_protocol\' must be "3.1.1" or "5"')
    training = values.get("training", TrainingConfig())
    for key in ("batch_size", "local_epochs", "threads"):
        if getattr(training, key) < 1:
            raise ConfigError(f"key 'training.{key}' must be >= 1")
    if training.engine not in ENGINE_CHOICES:
        raise ConfigError(
            f"key 'training.engine' must be one of {', '.join(repr(e) for e in ENGINE_CHOICES)}, got {training.engine!r}"
        )
    if training.max_steps is not None and training.max_steps < 1:
        raise ConfigError("key 'training.max_steps' must be >= 1")
    privacy = values.get("privacy", PrivacyConfig())
    if privacy.clip_norm is not None and not 0 < privacy.clip_norm < float("inf"):
        raise ConfigError("key 'privacy.clip_norm' must be a number > 0")
    if not 0 <= privacy.local_noise_multiplier < float("inf"):
        raise ConfigError("key 'privacy.local_noise_multiplier' must be a number >= 0")
    if privacy.local_noise_multiplier > 0 and privacy.clip_norm is None:
        raise ConfigError("key 'privacy.local_noise_multiplier' needs 'privacy.clip_norm' (the noise is scaled to it)")
    if base_dir is not None:
        for key in ("bundle", "data", "state_dir"):
            values[key] = str((base_dir / values[key]).resolve()) if not Path(values[key]).is_absolute() else values[key]
    return DeviceConfig(**values)


def load_device_config(path: str | Path) -> DeviceConfig:
    path = Path(path)
    doc = read_toml(path)
    try:
        return parse_device_config(doc, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

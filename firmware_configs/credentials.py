"""One device's secrets, picked out of a fleet's credentials directory.

The directory is what `fleetlearn broker-config` writes:

    DIR/ca.crt                               the broker's CA certificate (public)
    DIR/devices/<device_id>/mqtt-password    this device's MQTT password
    DIR/devices/<device_id>/signing.key      this device's Ed25519 private key (optional)
    DIR/aggregator/signing.pub               the aggregator's public key (optional)

Files are named one by one, never globbed: an image must never carry another device's secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetlearn.firmware_configs.errors import FlashError

# Names inside the image's secrets/ directory (and PREFIX/secrets on the device).
MQTT_PASSWORD = "mqtt-password"
CA_CERT = "ca.crt"
SIGNING_KEY = "signing.key"
AGGREGATOR_PUB = "aggregator-signing.pub"


@dataclass(frozen=True)
class DeviceSecrets:
    """Secret file name in the image -> its bytes. Public keys travel here too: they live beside the
    secrets on the device, and the CA pins which broker the device trusts."""

    files: dict[str, bytes]
    signing_public_key: bytes | None = None  # set when a fresh signing key was made at flash time

    def has(self, name: str) -> bool:
        return name in self.files


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FlashError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise FlashError(f"{what}: {path}: {exc.strerror}") from None
    if not data.strip():
        raise FlashError(f"{what}: {path} is empty")
    return data


def collect(credentials_dir: Path | None, device_id: str) -> dict[str, bytes]:
    """This device's files from `credentials_dir` (nothing when it is None). Raises FlashError."""
    if credentials_dir is None:
        return {}
    root = Path(credentials_dir)
    if not root.is_dir():
        raise FlashError(f"--credentials {root}: not a directory")
    device_dir = root / "devices" / device_id
    if not device_dir.is_dir():
        raise FlashError(
            f"--credentials {root}: no credentials for device {device_id!r} (expected {device_dir}/{MQTT_PASSWORD}; "
            "add the device with `fleetlearn broker-config` first)"
        )
    files = {MQTT_PASSWORD: _read(device_dir / MQTT_PASSWORD, "--credentials")}
    optional = {CA_CERT: root / "ca.crt", SIGNING_KEY: device_dir / "signing.key", AGGREGATOR_PUB: root / "aggregator" / "signing.pub"}
    for name, path in optional.items():
        if path.exists():
            files[name] = _read(path, "--credentials")
    return files


def new_signing_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM).

    Made on the operator's machine at flash time so the public half can be registered with the
    aggregator before the device ever connects. Needs `cryptography` (server extra)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise FlashError("--new-signing-key needs the `cryptography` package: pip install 'fleetlearn[server]'") from None
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def device_secrets(credentials_dir: Path | None, device_id: str, fresh_signing_key: bool) -> DeviceSecrets:
    files = collect(credentials_dir, device_id)
    if not fresh_signing_key:
        return DeviceSecrets(files)
    if SIGNING_KEY in files:
        raise FlashError(f"--new-signing-key: {credentials_dir}/devices/{device_id}/signing.key already exists; use it or remove it")
    private, public = new_signing_key()
    files[SIGNING_KEY] = private
    return DeviceSecrets(files, signing_public_key=public)

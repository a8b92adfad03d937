"""One device's secrets, picked out of a fleet's credentials directory (`flash --credentials`).

The directory is what `fleetlearn broker-config` writes (fleetlearn.provisioning.layout); a
device image gets:

    ca.crt                  DIR/ca.crt: the broker's CA certificate (public)
    mqtt-password           DIR/devices/<device_id>/mqtt-password
    signing.key             DIR/devices/<device_id>/signing.key (optional)
    aggregator-signing.pub  DIR/aggregator/signing.pub: the aggregator's public key (optional)

Files are named one by one, never globbed: an image must never carry another device's secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleetlearn.provisioning.errors import CredentialsError
from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.pki import new_signing_key_pair

# Names inside the image's secrets/ directory (and PREFIX/secrets on the device).
MQTT_PASSWORD = "mqtt-password"  # the same name as in the credentials directory
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
        raise CredentialsError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise CredentialsError(f"{what}: {path}: {exc.strerror}") from None
    if not data.strip():
        raise CredentialsError(f"{what}: {path} is empty")
    return data


def collect(credentials_dir: Path | None, device_id: str) -> dict[str, bytes]:
    """This device's files from `credentials_dir` (nothing when it is None). Raises CredentialsError."""
    if credentials_dir is None:
        return {}
    root = Path(credentials_dir)
    if not root.is_dir():
        raise CredentialsError(f"--credentials {root}: not a directory")
    layout = CredentialsLayout(root)
    if not layout.device_dir(device_id).is_dir():
        raise CredentialsError(
            f"--credentials {root}: no credentials for device {device_id!r} (expected {layout.device_password(device_id)}; "
            "add the device with `fleetlearn broker-config` first)"
        )
    files = {MQTT_PASSWORD: _read(layout.device_password(device_id), "--credentials")}
    optional = {
        CA_CERT: layout.ca_cert,
        SIGNING_KEY: layout.device_signing_key(device_id),
        AGGREGATOR_PUB: layout.aggregator_signing_pub,
    }
    for name, path in optional.items():
        if path.exists():
            files[name] = _read(path, "--credentials")
    return files


def device_secrets(credentials_dir: Path | None, device_id: str, fresh_signing_key: bool) -> DeviceSecrets:
    files = collect(credentials_dir, device_id)
    if not fresh_signing_key:
        return DeviceSecrets(files)
    if SIGNING_KEY in files:
        raise CredentialsError(
            f"--new-signing-key: {CredentialsLayout(Path(str(credentials_dir))).device_signing_key(device_id)} already exists; use it or remove it"
        )
    # Made on the operator's machine at flash time so the public half can be registered with
    # the aggregator before the device ever connects.
    private, public = new_signing_key_pair("--new-signing-key")
    files[SIGNING_KEY] = private
    return DeviceSecrets(files, signing_public_key=public)

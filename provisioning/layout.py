"""The credentials directory of a fleet: the one place that knows its file names.

`fleetlearn broker-config --out DIR` writes it, `fleetlearn flash --credentials DIR` picks one
device's files out of it, and the aggregator's operator points `--password-file`,
`--signing-key` and `--device-keys` into it:

    DIR/mosquitto.conf, passwd, acl, data/   the broker's files
    DIR/ca.crt, server.crt, server.key       with --tls: the fleet's CA and the broker's certificate
    DIR/ca.key                               with --tls: the CA's private key; stays with the operator
    DIR/README.md                            which file goes where
    DIR/systemd/*.service                    hardened units for mosquitto and the aggregator
    DIR/aggregator/mqtt-password             the aggregator's MQTT password
    DIR/aggregator/signing.key|.pub          with --signing-keys: the aggregator's Ed25519 key pair
    DIR/aggregator/device-keys/<id>.pub      with --signing-keys: every device's public key
    DIR/monitor/mqtt-password                with --monitor: the read-only monitor user's password
    DIR/devices/<id>/mqtt-password           each device's MQTT password
    DIR/devices/<id>/signing.key|.pub        with --signing-keys: each device's Ed25519 key pair

Standard library only: the aggregator and flash import it without the provisioning tool's
dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MQTT_PASSWORD = "mqtt-password"
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
PUB_SUFFIX = ".pub"  # DIR/aggregator/device-keys/<device_id>.pub


@dataclass(frozen=True)
class CredentialsLayout:
    """Paths inside one fleet's credentials directory `root`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---------------------------------------------------------- the broker's files

    @property
    def mosquitto_conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def systemd_dir(self) -> Path:
        return self.root / "systemd"

    def mosquitto_unit(self, fleet: str) -> Path:
        return self.systemd_dir / f"fleetlearn-mosquitto-{fleet}.service"

    def aggregator_unit(self, fleet: str) -> Path:
        return self.systemd_dir / f"fleetlearn-aggregator-{fleet}.service"

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    # ---------------------------------------------------------- per role

    @property
    def aggregator_dir(self) -> Path:
        return self.root / "aggregator"

    @property
    def monitor_dir(self) -> Path:
        return self.root / "monitor"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    def device_dir(self, device_id: str) -> Path:
        return self.devices_dir / device_id

    def mqtt_password(self, role_dir: Path) -> Path:
        """The MQTT password file of the role whose directory is `role_dir`."""
        return role_dir / MQTT_PASSWORD

    def device_password(self, device_id: str) -> Path:
        return self.device_dir(device_id) / MQTT_PASSWORD

    def device_signing_key(self, device_id: str) -> Path:
        return self.device_dir(device_id) / SIGNING_KEY

    def device_signing_pub(self, device_id: str) -> Path:
        return self.device_dir(device_id) / SIGNING_PUB

    @property
    def aggregator_password(self) -> Path:
        return self.aggregator_dir / MQTT_PASSWORD

    @property
    def monitor_password(self) -> Path:
        return self.monitor_dir / MQTT_PASSWORD

    @property
    def aggregator_signing_key(self) -> Path:
        return self.aggregator_dir / SIGNING_KEY

    @property
    def aggregator_signing_pub(self) -> Path:
        return self.aggregator_dir / SIGNING_PUB

    @property
    def device_keys_dir(self) -> Path:
        """Every device's public key as <device_id>.pub: what `aggregator --device-keys` imports."""
        return self.aggregator_dir / "device-keys"

    def device_key_registration(self, device_id: str) -> Path:
        return self.device_keys_dir / f"{device_id}{PUB_SUFFIX}"

    def relative(self, path: Path) -> str:
        """`path` relative to the root, for READMEs and messages ("devices/dev-0/mqtt-password")."""
        return str(Path(path).relative_to(self.root))

"""What one device image is made of, fully resolved and checked before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.firmware_configs.errors import FlashError
from fleetlearn.firmware_configs.profiles import Profile
from fleetlearn.provisioning.credentials import DeviceSecrets

DEFAULT_PREFIX = "/opt/fleetlearn"
SERVICE_NAME = "fleetlearn-device.service"
# The prefix and data path end up unquoted in a systemd unit and in shell: keep them boring.
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")


def check_device_path(value: str, option: str) -> str:
    """An absolute path on the device, safe to write into device.toml, a unit file and install.sh."""
    if not _SAFE_PATH_RE.fullmatch(value) or "/../" in value + "/" or "//" in value:
        raise FlashError(f"{option} {value!r}: use an absolute path on the device of letters, digits, '.', '_', '-' and '/'")
    return value.rstrip("/") or "/"


@dataclass(frozen=True)
class ImageSpec:
    profile: Profile  # with per-device systemd overrides already applied
    device_id: str
    fleet: str
    broker: str
    prefix: str  # install prefix on the device, e.g. /opt/fleetlearn
    data: str  # training data path on the device
    bundle_dir: Path  # the verified export bundle on this machine
    manifest: Manifest
    secrets: DeviceSecrets
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def bundle_path(self) -> str:
        # Not PREFIX/bundle itself: the agent swaps a new bundle in by renaming a sibling
        # directory (edge_runtime/device/bundle_fetch.py), so the bundle's *parent* must be writable
        # by the service; PREFIX/bundle is that parent and nothing else lives in it.
        return f"{self.prefix}/bundle/current"

    @property
    def bundle_parent(self) -> str:
        return f"{self.prefix}/bundle"

    @property
    def engine(self) -> str:
        """The device's training engine: the profile's, unless `--set training.engine=` says otherwise.
        It decides which wheels the image carries (wheels.dependency_requirements)."""
        return str((self.config_overrides.get("training") or {}).get("engine", self.profile.training.engine))

    def secret_path(self, name: str) -> str:
        return f"{self.prefix}/secrets/{name}"

"""Helpers and fixtures shared by the test_flash*.py files (this file holds no tests).

Every flash runs the real CLI (`python -m fleetlearn.cli flash ...`) in a subprocess, so exit
codes, stderr and "nothing written" are observed exactly as an operator sees them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEVICE_A, DEVICE_B = "dev-a", "dev-b"


def flash(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "fleetlearn.cli", "flash", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def flash_ok(*args: str | Path) -> subprocess.CompletedProcess:
    proc = flash(*args)
    assert proc.returncode == 0, f"flash failed ({proc.returncode}): {proc.stderr}"
    return proc


def base_args(bundle: Path, out: Path, device_id: str = DEVICE_A, profile: str = "generic-x86_64") -> list[str]:
    """Fast by default: no dependency wheels (the install test carries them)."""
    return [
        "--profile",
        profile,
        "--bundle",
        str(bundle),
        f"--device-id={device_id}",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--out",
        str(out),
        "--no-deps-wheels",
    ]


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mode bits, bytes) for every file and directory under `root`."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = path.stat().st_mode & 0o7777
        out[rel] = (mode, b"" if path.is_dir() else path.read_bytes())
    return out


def listing(directory: Path) -> list[str]:
    """Everything in `directory`, hidden temporaries included (to prove nothing was left behind)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _pem_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def credentials(tmp_path) -> Path:
    """A credentials directory laid out like `fleetlearn broker-config` writes it, for two devices."""
    root = tmp_path / "creds"
    for device in (DEVICE_A, DEVICE_B):
        d = root / "devices" / device
        d.mkdir(parents=True)
        (d / "mqtt-password").write_text(f"password-of-{device}-7f3a9c\n")
        (d / "signing.key").write_bytes(_pem_key())
    (root / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nTEST-CA\n-----END CERTIFICATE-----\n")
    (root / "aggregator").mkdir()
    (root / "aggregator" / "signing.pub").write_text("-----BEGIN PUBLIC KEY-----\nTEST-AGG\n-----END PUBLIC KEY-----\n")
    return root


@pytest.fixture(scope="session")
def x86_wheelhouse(tmp_path_factory) -> Path:
    """Dependency wheels for generic-x86_64, fetched once per session, so each install is offline."""
    from fleetlearn.firmware_configs.profiles import load_profile

    profile = load_profile("generic-x86_64")
    dest = tmp_path_factory.mktemp("wheelhouse")
    cmd = [
        PY,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        profile.python,
        "--dest",
        str(dest),
    ]
    for tag in profile.platform_tags():
        cmd += ["--platform", tag]
    cmd += ["numpy>=1.24", "onnxruntime-training==1.19.2", "paho-mqtt>=2.1,<3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip download failed: {proc.stderr[-2000:]}"
    return dest


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def clean_env() -> dict[str, str]:
    """The environment for processes that must not see this checkout (the installed venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env

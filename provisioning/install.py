"""Writing a credentials directory: every file created with its final mode, the whole tree
built in a temporary directory beside --out and renamed into place, so a failure leaves no
half-written directory and no secret is ever briefly world-readable."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from fleetlearn.provisioning.acl import acl_text
from fleetlearn.provisioning.errors import BrokerConfigError
from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.limits import Limits, ModelSize
from fleetlearn.provisioning.mosquitto_conf import conf_text
from fleetlearn.provisioning.passwords import make_credentials, password_file_text
from fleetlearn.provisioning.pki import make_tls_files, write_fleet_signing_keys
from fleetlearn.provisioning.readme import readme_text
from fleetlearn.provisioning.spec import FleetSpec
from fleetlearn.provisioning.systemd_units import systemd_units


def write_file(path: Path, data: str | bytes, mode: int) -> None:
    """Create `path` with `mode` from the first byte (never briefly world-readable)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    _private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)  # the umask may have narrowed it; make it exactly `mode`


def _private_dirs(path: Path) -> None:
    """mkdir -p with 0700 on every level created (pathlib gives `mode` to the leaf only)."""
    if path.is_dir():
        return
    _private_dirs(path.parent)
    path.mkdir(mode=0o700)


def write_tree(root: Path, spec: FleetSpec, limits: Limits, size: ModelSize) -> None:
    """Everything into `root` (a fresh temporary directory)."""
    layout = CredentialsLayout(root)
    creds = make_credentials(spec, layout)
    for cred in creds:
        write_file(cred.password_file, cred.password + "\n", 0o600)
    write_file(layout.passwd, password_file_text(creds), 0o600)
    write_file(layout.acl, acl_text(spec), 0o600)
    write_file(layout.mosquitto_conf, conf_text(spec, limits), 0o644)
    if spec.tls:
        tls = make_tls_files(spec.fleet, spec.hosts)
        write_file(layout.ca_cert, tls.ca_cert, 0o644)
        write_file(layout.ca_key, tls.ca_key, 0o600)
        write_file(layout.server_cert, tls.server_cert, 0o644)
        write_file(layout.server_key, tls.server_key, 0o600)
    if spec.signing_keys:
        write_fleet_signing_keys(layout, spec.devices, write_file)
    layout.data.mkdir(mode=0o700)
    for path, text in systemd_units(spec, layout).items():
        write_file(path, text, 0o644)
    write_file(layout.readme, readme_text(spec, limits, size), 0o644)


def install_tree(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; with `force`, the old `out` is moved aside first and
    removed only once the new one is in place."""
    old: Path | None = None
    if out.exists():
        if not force:  # appeared while we were writing
            raise BrokerConfigError(f"--out {out} already exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(spec: FleetSpec, limits: Limits, size: ModelSize) -> None:
    """Write into a temporary directory beside `out`, then rename: a failure leaves no half-written `out`."""
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.out.name}.tmp-", dir=spec.out.parent))
    try:
        write_tree(tmp, spec, limits, size)
        install_tree(tmp, spec.out, spec.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

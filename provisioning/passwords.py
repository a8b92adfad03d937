"""MQTT users and mosquitto's password file.

The file is written in pure Python (the `$7$` format mosquitto 2.0's own mosquitto_passwd
writes), so an operator without mosquitto installed can provision a fleet; the file stays
editable with `mosquitto_passwd`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.spec import MONITOR_USER, FleetSpec

# mosquitto_passwd 2.0's own choice. The passwords are 32 random bytes (secrets.token_urlsafe),
# so key stretching adds nothing against guessing, while every connect pays for it: a fleet's
# reconnect storm after a broker restart would burn CPU on a large count.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12


@dataclass(frozen=True)
class Credential:
    username: str
    password: str
    password_file: Path  # where its plaintext goes inside the credentials directory


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto 2.0's `$7$` password hash: PBKDF2-HMAC-SHA512, base64 salt and 64-byte digest."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def make_credentials(spec: FleetSpec, layout: CredentialsLayout) -> list[Credential]:
    """One user per client, with a fresh password and its file in `layout`, in the password file's order."""
    creds = [Credential(spec.aggregator_user, new_password(), layout.aggregator_password)]
    if spec.monitor:
        creds.append(Credential(MONITOR_USER, new_password(), layout.monitor_password))
    creds += [Credential(d, new_password(), layout.device_password(d)) for d in spec.devices]
    return creds


def password_file_text(creds: Iterable[Credential]) -> str:
    return "".join(f"{c.username}:{hash_password(c.password)}\n" for c in creds)

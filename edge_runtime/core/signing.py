"""Ed25519 on the device: sign updates, verify the aggregator's global models and bundle announcements.

Imported only when the device config has a [signing] table (fleetlearn.edge_runtime.device.wiring.load_signer), since
it needs `cryptography` (the `signing` extra): a keyless device stays cryptography-free.

    signer = DeviceSigner.from_config(cfg.signing)
    payload = update.encode(sign=signer.sign)         # None when the device has no key_file
    signer.verify_global(global_model) -> bool        # True when no aggregator_public_key is set
    signer.verify_announcement(payload) -> bool       # ditto

What is signed (docs/security-signing.md):
  * UPDATE and GLOBAL frames: the 64-byte Ed25519 signature covers every byte before it (header,
    meta, body), see edge_runtime/core/protocol/frame.py. No key id travels: the aggregator picks the device
    key by the topic's device id, a device knows the one aggregator key.
  * The bundle announcement (JSON): a "signature" field, hex, over
    ANNOUNCEMENT_CONTEXT + the canonical JSON (sorted keys, "," ":" separators, ASCII) of every
    other field. The manifest inside lists each file's sha256, so a verified announcement pins
    every byte of the bundle the chunks deliver.

Keys on disk: the private key as unencrypted PKCS#8 PEM, public keys as SubjectPublicKeyInfo PEM
(what `fleetlearn flash --new-signing-key` and `fleetlearn broker-config --signing-keys` write).
The aggregator reuses these helpers (aggregator/signing.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.core.protocol import MAX_BUNDLE_ANNOUNCEMENT_BYTES, GlobalModel

try:
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(f"[signing] keys need the `cryptography` package: pip install 'fleetlearn[signing]' ({exc})") from None

if TYPE_CHECKING:
    from fleetlearn.edge_runtime.device.config import SigningConfig

log = logging.getLogger("fleetlearn.device")

SIG_LEN = 64  # Ed25519
ANNOUNCEMENT_CONTEXT = b"fleetlearn bundle announcement v1\n"
MAX_KEY_FILE_BYTES = 64 * 1024
SIG_HEX_RE = re.compile(r"^[0-9a-f]{128}$")


# ---------------------------------------------------------------- keys


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as (private PKCS#8 PEM, unencrypted; public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    return private_pem(key), public_pem(key.public_key())


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short id for logs: sha256 of the 32 raw public key bytes, first 16 hex digits."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: str | Path, what: str) -> bytes:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{what} {path}: {path.stat().st_size} bytes is not a key file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: unreadable ({exc.strerror or exc})") from None
    if not data.strip():
        raise ConfigError(f"{what} {path}: empty file")
    return data


def parse_private_key(data: bytes, what: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{what}: the key is encrypted; fleetlearn reads unencrypted PKCS#8 PEM keys (keep the file mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what}: not a PEM private key ({str(exc)[:80]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what}: a {type(key).__name__.lstrip('_')} key, fleetlearn signs with Ed25519 only")
    return key


def parse_public_key(data: bytes, what: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{what}: not a PEM public key ({str(exc)[:80]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{what}: a {type(key).__name__.lstrip('_')} key, fleetlearn verifies Ed25519 only")
    return key


def load_private_key(path: str | Path, what: str = "signing key") -> Ed25519PrivateKey:
    return parse_private_key(_read_key_file(path, what), f"{what} {path}")


def load_public_key(path: str | Path, what: str = "public key") -> Ed25519PublicKey:
    return parse_public_key(_read_key_file(path, what), f"{what} {path}")


def loose_permissions(path: str | Path) -> bool:
    """True when a private key file is readable or writable by group or others."""
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


# ---------------------------------------------------------------- signatures


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `key`'s Ed25519 signature of `data`; never raises."""
    if len(signature) != SIG_LEN:
        return False
    try:
        key.verify(bytes(signature), bytes(data))
        return True
    except InvalidSignature:
        return False


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def sign_announcement(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """The announcement JSON `payload` with a "signature" field added (any old one replaced)."""
    doc = json.loads(bytes(payload).decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("a bundle announcement is a JSON object")
    doc.pop("signature", None)
    signature = key.sign(ANNOUNCEMENT_CONTEXT + _canonical(doc))
    doc["signature"] = signature.hex()
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def verify_announcement(key: Ed25519PublicKey, payload: bytes) -> bool:
    """True when the announcement carries `key`'s signature over the rest of it; never raises."""
    if len(payload) > MAX_BUNDLE_ANNOUNCEMENT_BYTES:
        return False
    try:
        doc = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constants)
        if not isinstance(doc, dict):
            return False
        signature = doc.pop("signature", None)
        if not isinstance(signature, str) or not SIG_HEX_RE.fullmatch(signature):
            return False
        return verify(key, bytes.fromhex(signature), ANNOUNCEMENT_CONTEXT + _canonical(doc))
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return False


# ---------------------------------------------------------------- the device's signer


class DeviceSigner:
    """This device's update signer and its verifier of what the aggregator publishes.

    Either half may be absent: without `key_file` updates go unsigned (`sign` is None); without
    `aggregator_public_key` global models and announcements are taken unverified (logged once
    at start). With it, an unsigned or badly signed global model or announcement is rejected.
    """

    def __init__(self, private_key: Ed25519PrivateKey | None = None, aggregator_key: Ed25519PublicKey | None = None):
        self.private_key = private_key
        self.aggregator_key = aggregator_key

    @classmethod
    def from_config(cls, cfg: SigningConfig, device_id: str = "-") -> DeviceSigner:
        """Load the keys a [signing] table names; ConfigError (exit 2) for a missing or wrong key."""
        private = load_private_key(cfg.key_file, "[signing] key_file") if cfg.key_file else None
        aggregator = (
            load_public_key(cfg.aggregator_public_key, "[signing] aggregator_public_key") if cfg.aggregator_public_key else None
        )
        signer = cls(private, aggregator)
        if cfg.key_file and loose_permissions(cfg.key_file):
            log.warning(
                "event=signing_key_exposed device=%s key_file=%s reason='group or others may read the private key: chmod 600 it'",
                device_id,
                cfg.key_file,
            )
        fields = [
            f"signs_updates={'yes' if private else 'no'}",
            f"key={fingerprint(private)}" if private else "",
            f"verifies_globals={'yes' if aggregator else 'no'}",
            f"aggregator_key={fingerprint(aggregator)}" if aggregator else "",
        ]
        if aggregator is None:
            fields.append("reason='no [signing] aggregator_public_key: global models and bundle announcements are NOT verified'")
        log.log(
            logging.INFO if aggregator else logging.WARNING,
            "event=signing device=%s %s",
            device_id,
            " ".join(f for f in fields if f),
        )
        return signer

    @property
    def sign(self) -> Callable[[bytes], bytes] | None:
        """The protocol.Signer for Update.encode(sign=...), or None when this device has no key."""
        return self.private_key.sign if self.private_key is not None else None

    def verify_global(self, g: GlobalModel) -> bool:
        """True when `g` may be used: signed by the aggregator's key, or no aggregator key configured."""
        if self.aggregator_key is None:
            return True
        return bool(g.signature) and verify(self.aggregator_key, g.signature, g.signed_part)

    def verify_announcement(self, payload: bytes) -> bool:
        """True when a bundle announcement may be used (same rule as verify_global)."""
        if self.aggregator_key is None:
            return True
        return verify_announcement(self.aggregator_key, payload)

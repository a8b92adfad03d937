"""Update authentication on the aggregator: device public keys, its own signing key, replay rules.

In the state dir:

    device-keys/<device_id>.pub   each device's Ed25519 public key (SubjectPublicKeyInfo PEM), loaded
                                  at start; `fleetlearn aggregator --device-keys DIR` copies DIR/<id>.pub in
    aggregator-signing.key        the aggregator's private key (PKCS#8 PEM, 0600): made on the first start
                                  that uses keys, unless --signing-key FILE names one
    aggregator-signing.pub        the public half of the key in use: devices' [signing] aggregator_public_key
    seen_nonces.jsonl             the replay ledger: (device, nonce, round, digest) of this run's updates

Checks on every update (the `authenticate` hook of fleetlearn.aggregator.validation.validate_update, run after
decoding and the topic/meta identity check, before anything can be acked as accepted):

  1. signature: the key is the one registered for the *topic's* device id (no key id travels).
     A signed update from a device with a registered key must verify, whatever the mode.
     Require mode (--require-signatures; the default when device keys are registered) rejects
     unsigned updates and updates from devices with no registered key. --allow-unsigned takes
     unsigned updates (and signed ones from devices without a key, unverified), logged once
     per device for the first UNVERIFIED_LOGGED_SINGLY devices, then each time their count doubles.
  2. replay, for updates of the current run (docs/security-signing.md has the rules):
       nonce never seen for this device            -> recorded, go on
       seen in the same round with the same bytes  -> an idempotent re-send: go on (validation
                                                      acks it as a duplicate, or rejects it as late)
       seen in another round                       -> "replay: nonce ... already used in round r"
       seen in the same round, different content   -> "replay: nonce ... already used for a
                                                      different update in round r"
     The ledger (aggregator/replay_ledger.py) keeps each device's nonces of the last KEEP_ROUNDS
     rounds (at most MAX_PER_DEVICE per device) and survives restarts: appended (not fsynced) and
     flushed to the OS before any verdict leaves the process (`flush`, called by aggregator/intake.py
     before each ack), compacted once a round.

`cryptography` is imported only when keys are in use: a keyless fleet's aggregator runs without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.aggregator.logs import kv
from fleetlearn.aggregator.replay_ledger import NonceLedger
from fleetlearn.aggregator.validation import Rejection, VersionSource
from fleetlearn.edge_runtime.core.errors import ConfigError, UsageError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes
from fleetlearn.edge_runtime.core.protocol import NAME_RE, Update
from fleetlearn.provisioning.layout import PUB_SUFFIX, CredentialsLayout

log = logging.getLogger("fleetlearn.aggregator")

DEVICE_KEYS_DIR = "device-keys"
AGGREGATOR_KEY = "aggregator-signing.key"
AGGREGATOR_PUB = "aggregator-signing.pub"
LEDGER = "seen_nonces.jsonl"
UNVERIFIED_LOGGED_SINGLY = 10  # unverified devices logged one by one; then at 16, 32, 64, ...
_FLEET_DIR = CredentialsLayout(Path("DIR"))  # a credentials directory, for messages naming its files


def _crypto():
    """fleetlearn.edge_runtime.core.signing (cryptography), imported on first use; UsageError when missing."""
    try:
        from fleetlearn.edge_runtime.core import signing
    except ConfigError as exc:
        raise UsageError(f"update signing: {exc}") from None
    return signing


# ---------------------------------------------------------------- device keys


def read_device_keys(directory: Path) -> dict[str, Any]:
    """device id -> Ed25519PublicKey for every `<device_id>.pub` in `directory` (none: {}).

    A file that is not an Ed25519 public key, or whose name is not a device id, is an error: an
    operator who registered a key expects it to count."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    names = sorted(p for p in directory.iterdir() if p.name.endswith(PUB_SUFFIX) and not p.name.startswith("."))
    if not names:
        return {}
    signing = _crypto()
    keys: dict[str, Any] = {}
    for path in names:
        device = path.name[: -len(PUB_SUFFIX)]
        if not NAME_RE.fullmatch(device):
            raise UsageError(f"{path}: {device!r} is not a device id (files are named <device_id>.pub)")
        keys[device] = signing.load_public_key(path, "device key")
    return keys


def import_device_keys(source: Path, state_dir: Path) -> list[tuple[str, str]]:
    """Copy SOURCE/<device_id>.pub into STATE_DIR/device-keys/ after checking each one.

    Returns (device, what) pairs, what one of "added", "replaced" (rotation), "unchanged".
    Everything is checked before anything is written."""
    source = Path(source)
    if not source.is_dir():
        raise UsageError(f"--device-keys {source}: not a directory")
    keys = read_device_keys(source)
    if not keys:
        raise UsageError(
            f"--device-keys {source}: no <device_id>.pub files (broker-config --signing-keys writes them to {_FLEET_DIR.device_keys_dir})"
        )
    signing = _crypto()
    target = Path(state_dir) / DEVICE_KEYS_DIR
    target.mkdir(parents=True, exist_ok=True)
    done = []
    for device, key in keys.items():
        pem = signing.public_pem(key)
        dest = target / f"{device}{PUB_SUFFIX}"
        try:
            old = dest.read_bytes()
        except FileNotFoundError:
            old = None
        if old is not None and _same_key(signing, old, key):
            done.append((device, "unchanged"))
            continue
        atomic_write_bytes(dest, pem)
        os.chmod(dest, 0o644)
        done.append((device, "added" if old is None else "replaced"))
    return done


def _same_key(signing, pem: bytes, key) -> bool:
    try:
        return signing.public_pem(signing.parse_public_key(pem, "old key")) == signing.public_pem(key)
    except ConfigError:
        return False


def update_digest(update: Update) -> str:
    """What identifies an update's content for the replay rules: sha256 of the signed bytes
    (header, meta, body; the whole frame when unsigned), 128 bits."""
    return hashlib.sha256(update.signed_part).hexdigest()[:32]


# ---------------------------------------------------------------- the aggregator's signing state


@dataclass
class AggregatorSigning:
    """What the round engine needs: `sign` for global models, `sign_announcement`, `authenticate`."""

    device_keys: dict[str, Any]
    require: bool
    private_key: Any | None  # Ed25519PrivateKey, or None: globals go unsigned
    ledger: NonceLedger
    _unverified_logged: set[str] = field(default_factory=set)

    def flush(self) -> None:
        """Make the replay ledger's new entries survive the process (before any verdict leaves)."""
        self.ledger.flush()

    @property
    def sign(self) -> Callable[[bytes], bytes] | None:
        """The protocol.Signer for GlobalModel.encode(sign=...), or None without a key."""
        return self.private_key.sign if self.private_key is not None else None

    def sign_announcement(self, payload: bytes) -> bytes:
        """The bundle announcement with the aggregator's signature field (unchanged without a key)."""
        if self.private_key is None:
            return payload
        return _crypto().sign_announcement(self.private_key, payload)

    def authenticate(self, device: str, update: Update, version: VersionSource) -> None:
        """Raise Rejection unless `update` (decoded, posted on `device`'s topic) is authentic and
        no replay. See the module docstring for the rules."""
        key = self.device_keys.get(device)
        if update.signature and key is not None:
            if not _crypto().verify(key, update.signature, update.signed_part):
                why = f"{len(update.signature)}-byte signature, Ed25519 has 64" if len(update.signature) != 64 else "signature"
                raise Rejection(
                    f"bad {why}: the update does not verify with device {device}'s registered key",
                    device,
                    update.round,
                    update.nonce,
                )
        elif self.require:
            if key is None:
                raise Rejection(
                    f"no signing key is registered for device {device}; this aggregator requires signed updates",
                    device,
                    update.round,
                    update.nonce,
                )
            raise Rejection("unsigned update; this aggregator requires signed updates", device, update.round, update.nonce)
        elif device not in self._unverified_logged:
            self._unverified_logged.add(device)
            n = len(self._unverified_logged)
            # One line per device for the first few; past those, one line each time the count
            # doubles: a fleet of 10,000 unsigned devices logs ~20 lines, not 10,000 (each line
            # also cost the first round ~30 us per device in bench_ingest).
            if n <= UNVERIFIED_LOGGED_SINGLY or n & (n - 1) == 0:
                what = "unsigned" if not update.signature else "signed, but no key is registered for the device"
                log.warning(
                    "%s",
                    kv(
                        event="update_unverified",
                        device=device,
                        round=update.round,
                        unverified_devices=n,
                        reason=f"{what}; taken unverified (signatures not required), logged once per device for the first "
                        f"{UNVERIFIED_LOGGED_SINGLY} devices, then when the count of unverified devices doubles",
                    ),
                )
        if update.run_id == version.run_id:
            reason = self.ledger.check(device, update.nonce, update.round, update_digest(update), version.open_round)
            if reason is not None:
                raise Rejection(reason, device, update.round, update.nonce)


def open_signing(
    state_dir: Path,
    run_id: str,
    open_round: int,
    *,
    signing_key: Path | None = None,
    device_keys: Path | None = None,
    require: bool | None = None,
) -> AggregatorSigning:
    """Import and load keys, pick the mode, open the replay ledger. UsageError on bad keys.

    Keys are "in use" when device keys are registered, --require-signatures or --signing-key is
    given, or the state dir already holds an aggregator key; then global models are signed."""
    state_dir = Path(state_dir)
    if device_keys is not None:
        for device, what in import_device_keys(device_keys, state_dir):
            if what != "unchanged":
                log.info("%s", kv(event=f"device_key_{what}", device=device, round="-", source=str(device_keys)))
    keys = read_device_keys(state_dir / DEVICE_KEYS_DIR)
    require = bool(keys) if require is None else require
    if require and not keys:
        raise UsageError(
            f"--require-signatures: no device keys in {state_dir / DEVICE_KEYS_DIR} (add them with --device-keys DIR, "
            f"e.g. the {_FLEET_DIR.device_keys_dir} that broker-config --signing-keys writes)"
        )
    own = state_dir / AGGREGATOR_KEY
    private = None
    source = ""
    if signing_key is not None:
        private = _crypto().load_private_key(signing_key, "--signing-key")
        source = str(signing_key)
    elif own.exists():
        private = _crypto().load_private_key(own, "aggregator key")
        source = str(own)
    elif keys or require:
        signing = _crypto()
        pem, _ = signing.new_key_pair()
        _write_private(own, pem)
        private = signing.parse_private_key(pem, "new aggregator key")
        source = f"{own} (new)"
    if private is not None:
        signing = _crypto()
        pub = signing.public_pem(private.public_key())
        pub_path = state_dir / AGGREGATOR_PUB
        if not pub_path.exists() or pub_path.read_bytes() != pub:
            atomic_write_bytes(pub_path, pub)
            os.chmod(pub_path, 0o644)
        if signing.loose_permissions(signing_key or own):
            log.warning(
                "%s",
                kv(
                    event="signing_key_exposed",
                    round="-",
                    key_file=str(signing_key or own),
                    reason="group or others may read the aggregator's private key: chmod 600 it",
                ),
            )
    ledger = NonceLedger(state_dir / LEDGER, run_id, open_round)
    log.info(
        "%s",
        kv(
            event="signing",
            round="-",
            device_keys=len(keys),
            require_signatures="yes" if require else "no",
            globals_signed="yes" if private is not None else "no",
            aggregator_key=_crypto().fingerprint(private) if private is not None else "-",
            key_file=source or "-",
        ),
    )
    return AggregatorSigning(keys, require, private, ledger)


def _write_private(path: Path, pem: bytes) -> None:
    """Create `path` 0600 from its first byte; never replace an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())

"""The typed wire messages of a round: round config, invitation, global model, update, ack, round state, status.

One dataclass per message, each with `encode()` and a `decode()` that treats its input as
hostile (sizes bounded before allocating, every field checked, ProtocolError with a one-line
reason). `UpdateHeader` reads who sent an update for which round without decoding its body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.encodings import NONE, Compression, decode_tensor, encode_tensor, max_body_bytes
from fleetlearn.edge_runtime.core.protocol.fields import (
    HEX32_RE,
    HEX64_RE,
    MAX_ROUND,
    NAME_RE,
    check_float,
    check_int,
    check_str,
    decode_json,
    encode_json,
)
from fleetlearn.edge_runtime.core.protocol.frame import (
    HEADER_SIZE,
    MAX_META_BYTES,
    Kind,
    Signer,
    decode_frame,
    encode_frame,
    peek_meta,
    tensor_from_body,
    tensor_to_body,
)

MAX_MODEL_PARAMS = 1 << 26  # the largest model a device accepts (and broker limits are sized for)
MAX_DECODE_PARAMS = 1 << 28  # GlobalModel.decode's bound when the caller gives none
# --max-message-size's floor: every JSON control message (64 KiB) and a part frame's header and
# meta must fit in one message; AWS IoT Core's 128 KB and Azure IoT Hub's 256 KB are above it.
MIN_MAX_MESSAGE_SIZE = 64 * 1024 + HEADER_SIZE + MAX_META_BYTES
MAX_MAX_MESSAGE_SIZE = 256 << 20  # MQTT's own limit
MAX_PROXIMAL_MU = 1000.0  # FedProx's mu: the paper's grid is 0.001 .. 1; far above that only freezes w


@dataclass(frozen=True)
class RoundConfig:
    """Training settings the aggregator asks of every device this round (None: device's own).
    `proximal_mu`: FedProx's mu (train on loss + mu/2 ||w - w_global||^2); absent means 0."""

    local_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    compression: str | None = None  # encodings.Compression's text form; None: float32
    max_message_size: int | None = None  # bytes; larger messages travel in parts (protocol/parts.py)
    proximal_mu: float | None = None

    def to_meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @property
    def compression_spec(self) -> Compression:
        return Compression.parse(self.compression) if self.compression is not None else NONE

    @classmethod
    def from_meta(cls, doc: Any) -> RoundConfig:
        if not isinstance(doc, dict):
            raise ProtocolError("field 'config' must be an object")
        unknown = set(doc) - {"local_epochs", "max_steps", "batch_size", "lr", "compression", "max_message_size", "proximal_mu"}
        if unknown:
            raise ProtocolError(f"round config has unknown keys {sorted(unknown)}")
        return cls(
            local_epochs=check_int(doc, "local_epochs", 1, 10_000) if "local_epochs" in doc else None,
            max_steps=check_int(doc, "max_steps", 1, 10**9) if "max_steps" in doc else None,
            batch_size=check_int(doc, "batch_size", 1, 1 << 20) if "batch_size" in doc else None,
            lr=check_float(doc, "lr", 0.0, 10.0) if "lr" in doc else None,
            compression=str(Compression.parse(doc["compression"])) if "compression" in doc else None,
            max_message_size=check_int(doc, "max_message_size", MIN_MAX_MESSAGE_SIZE, MAX_MAX_MESSAGE_SIZE)
            if "max_message_size" in doc
            else None,
            proximal_mu=check_float(doc, "proximal_mu", 0.0, MAX_PROXIMAL_MU) if "proximal_mu" in doc else None,
        )


RANK_SPACE = 1 << 64  # invitation ranks are 64-bit


def invitation_rank(salt: str, device_id: str) -> int:
    """A device's rank for one round: the first 8 bytes of sha256(salt bytes || device id), as a
    big-endian unsigned integer. Uniform and independent across devices for a fresh salt."""
    return int.from_bytes(hashlib.sha256(bytes.fromhex(salt) + device_id.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Invitation:
    """Which devices are asked to train this round (client sampling), in a constant size whatever
    the fleet: device d is invited iff invitation_rank(salt, d) < below.

    Carried in the GLOBAL frame's meta as {"salt": 32 hex, "below": int} (absent: every device is
    asked, as without sampling). The aggregator draws a fresh salt per round and sets `below` just
    above the rank of the last device it wants, so exactly the devices it picked among those it
    sees online are invited (a 1,000-device cohort costs the same 60-odd bytes as a 3-device one,
    and the frame stays within its meta bound). The aggregator applies the same rule to refuse
    updates from devices that were not invited. Signed with the frame when signing is on."""

    salt: str  # 32 hex (128 bits), fresh per round
    below: int  # 0 .. 2^64: 0 invites no one, 2^64 everyone

    def invites(self, device_id: str) -> bool:
        return invitation_rank(self.salt, device_id) < self.below

    def to_meta(self) -> dict[str, Any]:
        return {"salt": self.salt, "below": self.below}

    @classmethod
    def from_meta(cls, doc: Any) -> Invitation:
        if not isinstance(doc, dict):
            raise ProtocolError("field 'invite' must be an object")
        unknown = set(doc) - {"salt", "below"}
        if unknown:
            raise ProtocolError(f"invitation has unknown keys {sorted(unknown)[:5]}")
        return cls(salt=check_str(doc, "salt", HEX32_RE), below=check_int(doc, "below", 0, RANK_SPACE))


@dataclass(frozen=True)
class GlobalModel:
    """Retained on `global`: the weights that open round `round` (train=False once the run is over)."""

    run_id: str  # 32 hex: one aggregator run (a fresh state dir); round ids restart per run
    round: int
    model_hash: str
    weights: np.ndarray
    train: bool = True
    total_rounds: int = 0
    deadline: float = 0.0  # unix time the round closes at (informational for devices)
    config: RoundConfig = field(default_factory=RoundConfig)
    invite: Invitation | None = None  # None: every device trains (no sampling)
    signature: bytes = b""
    signed_part: bytes = b""

    def encode(self, sign: Signer | None = None) -> bytes:
        meta = {
            "run_id": self.run_id,
            "round": self.round,
            "model_hash": self.model_hash,
            "train": self.train,
            "total_rounds": self.total_rounds,
            "deadline": self.deadline,
            "config": self.config.to_meta(),
            "n": int(self.weights.size),
        }
        if self.invite is not None:
            meta["invite"] = self.invite.to_meta()
        return encode_frame(Kind.GLOBAL, meta, tensor_to_body(self.weights), sign=sign)

    @classmethod
    def decode(cls, payload: bytes, num_params: int | None = None, max_params: int = MAX_DECODE_PARAMS) -> GlobalModel:
        """Decode; `num_params` (from the device's bundle) pins the size when known."""
        limit = 4 * (num_params if num_params is not None else max_params)
        frame = decode_frame(payload, Kind.GLOBAL, max_body=limit)
        m = frame.meta
        n = check_int(m, "n", 1, max_params)
        if num_params is not None and n != num_params:
            raise ProtocolError(f"global model has {n} parameters, this bundle has {num_params}")
        train = m.get("train")
        if not isinstance(train, bool):
            raise ProtocolError("field 'train' must be true or false")
        return cls(
            run_id=check_str(m, "run_id", HEX32_RE),
            round=check_int(m, "round", 0, MAX_ROUND),
            model_hash=check_str(m, "model_hash", HEX64_RE),
            weights=tensor_from_body(frame, n),
            train=train,
            total_rounds=check_int(m, "total_rounds", 0, MAX_ROUND),
            deadline=check_float(m, "deadline", 0.0),
            config=RoundConfig.from_meta(m.get("config", {})),
            invite=Invitation.from_meta(m["invite"]) if m.get("invite") is not None else None,
            signature=frame.signature,
            signed_part=frame.signed_part,
        )


@dataclass(frozen=True)
class Update:
    """One device's contribution to one round: delta = local weights - global weights."""

    run_id: str
    round: int
    device_id: str
    model_hash: str
    samples: int
    train_loss: float
    train_s: float
    nonce: str  # 32 hex, fixed per (device, round): a re-send carries the same nonce
    delta: np.ndarray
    signature: bytes = b""
    signed_part: bytes = b""

    def encode(self, sign: Signer | None = None, compression: Compression = NONE, packed: bool = True) -> bytes:
        """The UPDATE frame, its delta encoded with `compression` (encodings.py; lossy but for none).
        `packed` (what devices send): the meta in its packed binary form (frame.py), 89 bytes +
        the device id instead of ~290 bytes of JSON; readers accept both forms."""
        meta = {
            "run_id": self.run_id,
            "round": self.round,
            "device_id": self.device_id,
            "model_hash": self.model_hash,
            "samples": self.samples,
            "train_loss": self.train_loss,
            "train_s": self.train_s,
            "nonce": self.nonce,
            "n": int(self.delta.size),
        }
        encoding, body = encode_tensor(self.delta, compression)
        return encode_frame(Kind.UPDATE, meta, body, encoding=encoding, sign=sign, packed=packed)

    @classmethod
    def decode(cls, payload: bytes, num_params: int) -> Update:
        """Decode and validate an update for a model of `num_params` parameters; whatever the
        body's encoding, `delta` is float32 (encodings.decode_tensor checks it as hostile).
        A float32 `delta`, `signature` and `signed_part` are read-only views of `payload` (no copy)."""
        frame = decode_frame(payload, Kind.UPDATE, max_body=max_body_bytes(num_params), views=True)  # zero-copy
        m = frame.meta
        n = check_int(m, "n", 1, num_params)
        if n != num_params:
            raise ProtocolError(f"update has {n} parameters, the model has {num_params}")
        return cls(
            run_id=check_str(m, "run_id", HEX32_RE),
            round=check_int(m, "round", 1, MAX_ROUND),
            device_id=check_str(m, "device_id", NAME_RE),
            model_hash=check_str(m, "model_hash", HEX64_RE),
            samples=check_int(m, "samples", 1, 2**31 - 1),
            train_loss=check_float(m, "train_loss"),
            train_s=check_float(m, "train_s", 0.0),
            nonce=check_str(m, "nonce", HEX32_RE),
            delta=decode_tensor(frame.encoding, frame.body, n),
            signature=frame.signature,
            signed_part=frame.signed_part,
        )


def _maybe(check, *args: Any) -> Any:
    """The checked field, or None when it is missing or malformed (for best-effort readers)."""
    try:
        return check(*args)
    except ProtocolError:
        return None


@dataclass(frozen=True)
class UpdateHeader:
    """Who sent an update for which round, read from its meta (JSON or packed) without decoding the body.

    For readers that cannot decode the whole update: the aggregator answering a frame that
    fails decoding (the ack carries its round and nonce when they are readable), a device
    recovering its pending update after a power cut, a monitor that does not know the model's
    size. Each field is checked as Update.decode checks it, and None when missing or malformed.
    """

    run_id: str | None
    round: int | None
    device_id: str | None
    nonce: str | None
    size: int  # the payload's bytes

    @classmethod
    def peek(cls, payload: bytes, *, verify_body: bool = False) -> UpdateHeader:
        """ProtocolError when the header or meta cannot be read; with `verify_body`, also when the
        frame's length or crc32 is wrong (the body itself is never parsed)."""
        if verify_body:
            meta = decode_frame(payload, Kind.UPDATE, max_body=len(payload)).meta
        else:
            meta = peek_meta(payload, Kind.UPDATE)
        return cls(
            run_id=_maybe(check_str, meta, "run_id", HEX32_RE),
            round=_maybe(check_int, meta, "round", 1, MAX_ROUND),
            device_id=_maybe(check_str, meta, "device_id", NAME_RE),
            nonce=_maybe(check_str, meta, "nonce", HEX32_RE),
            size=len(payload),
        )

    def require(self, *names: str) -> UpdateHeader:
        """Self, or ProtocolError naming the first of `names` that is missing or malformed."""
        for name in names:
            if getattr(self, name) is None:
                raise ProtocolError(f"update: field {name!r} is missing or malformed")
        return self


@dataclass(frozen=True)
class Ack:
    """Aggregator -> device: the update for `round` with `nonce` was accepted, or why not."""

    run_id: str
    round: int
    device_id: str
    nonce: str
    accepted: bool
    reason: str = ""

    def encode(self) -> bytes:
        return encode_json(
            {
                "run_id": self.run_id,
                "round": self.round,
                "device_id": self.device_id,
                "nonce": self.nonce,
                "accepted": self.accepted,
                "reason": self.reason[:300],
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        d = decode_json(payload, "ack")
        if not isinstance(d.get("accepted"), bool) or not isinstance(d.get("reason", ""), str):
            raise ProtocolError("ack: 'accepted' must be a boolean and 'reason' a string")
        return cls(
            check_str(d, "run_id", HEX32_RE),
            check_int(d, "round", 0, MAX_ROUND),
            check_str(d, "device_id", NAME_RE),
            check_str(d, "nonce", HEX32_RE),
            d["accepted"],
            d.get("reason", "")[:300],
        )


ROUND_STATES = ("open", "closed", "finished", "failed")


@dataclass(frozen=True)
class RoundState:
    """Retained on `round`: where the run is. Devices use `closed` to drop a pending update."""

    run_id: str
    round: int
    state: str
    total_rounds: int = 0
    deadline: float = 0.0
    min_devices: int = 0
    target_devices: int = 0
    accepted: int = 0
    reason: str = ""

    def encode(self) -> bytes:
        return encode_json(dict(self.__dict__))

    @classmethod
    def decode(cls, payload: bytes) -> RoundState:
        d = decode_json(payload, "round state")
        state = d.get("state")
        if state not in ROUND_STATES:
            raise ProtocolError(f"round state {state!r} not one of {ROUND_STATES}")
        return cls(
            run_id=check_str(d, "run_id", HEX32_RE),
            round=check_int(d, "round", 0, MAX_ROUND),
            state=state,
            total_rounds=check_int(d, "total_rounds", 0, MAX_ROUND),
            deadline=check_float(d, "deadline", 0.0),
            min_devices=check_int(d, "min_devices", 0, 1 << 30),
            target_devices=check_int(d, "target_devices", 0, 1 << 30),
            accepted=check_int(d, "accepted", 0, 1 << 30),
            reason=str(d.get("reason", ""))[:300],
        )

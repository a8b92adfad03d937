"""Checking one update before it counts. Pure functions of (topic, payload, round state).

Order (the first failing check is the reason sent back to the device):
  1. size:      payload <= header + max meta + max body (4 * num_params + 16) + max signature
  2. decode:    Update.decode(payload, num_params): frame, crc32, meta fields, size, finite values
  3. identity:  the topic's device id == the meta's device_id
  3b. authenticity (when an `authenticate` hook is given, aggregator/signing.py): the signature
                with the topic's device key, then the replay ledger (a nonce seen before)
  4. version:   run_id == current run, model_hash == bundle's, round == the open round
                (earlier: "round r closed", stale; later: "round r not open"); the model
                store's check_version() says which (aggregator/model_store.py)
  4b. invitation (client sampling, aggregator/sampling.py): the device was invited to the round
                ("<device> was not invited to round r")
  5. duplicate: this device already has an accepted update this round:
                same nonce -> accepted again, counted once (the device lost our ack);
                other nonce -> rejected "duplicate update for round r"
A re-send of an update that was counted in the round that just closed (same device, same
nonce) is answered accepted too ("counted before it closed"), so a device that lost its ack
at the close does not log a refusal for an update that did count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Topics, Update, UpdateHeader, max_body_bytes, max_frame_bytes

UNKNOWN_NONCE = "0" * 32  # acks for payloads whose nonce cannot be read


def max_update_bytes(num_params: int) -> int:
    """The largest UPDATE frame a model of `num_params` parameters can produce."""
    return max_frame_bytes(max_body_bytes(num_params), signed=True)


class Rejection(Exception):
    """An update that does not count: `reason` goes to the log and to the device's ack."""

    def __init__(self, reason: str, device: str | None, round_: int | None, nonce: str | None):
        super().__init__(reason)
        self.reason = reason
        self.device = device  # from the topic; None when the topic names no valid device
        self.round = round_  # from the meta when readable
        self.nonce = nonce  # from the meta when readable


@dataclass(frozen=True)
class Verdict:
    update: Update
    duplicate: bool = False  # already counted (same nonce): ack accepted, do not count again
    note: str = ""  # the ack's reason for an accepted duplicate


def peek_meta(payload: bytes) -> tuple[int | None, str | None]:
    """Best effort (round, nonce) from a frame that may fail full decoding, for the ack."""
    try:
        peek = UpdateHeader.peek(payload)
    except ProtocolError:
        return None, None
    return peek.round, peek.nonce


class VersionSource(Protocol):
    """What validation needs of the model store (fleetlearn.aggregator.model_store.ModelStore has it)."""

    run_id: str
    model_hash: str

    @property
    def open_round(self) -> int: ...

    def check_version(self, run_id: str, model_hash: str, rnd: int) -> str | None: ...


def validate_update(
    topic: str,
    payload: bytes,
    *,
    topics: Topics,
    num_params: int,
    version: VersionSource,
    accepted: Mapping[str, str],
    previous_accepted: Mapping[str, str] = {},
    authenticate: Callable[[str, Update, VersionSource], None] | None = None,
    invited: Callable[[str], bool] | None = None,
) -> Verdict:
    """The update in `payload` if it may count now; raises Rejection(reason) otherwise.

    `accepted` maps device -> nonce of this round's accepted updates, `previous_accepted`
    the same for the round that closed last. `invited(device)`, when the round samples devices,
    says whether the device was asked to train.
    """
    try:
        device = topics.device_of(topic, "update")
    except ProtocolError as exc:
        raise Rejection(exc.reason, None, None, None) from None
    if not payload:
        raise Rejection("empty payload", device, None, None)
    bound = max_update_bytes(num_params)
    if len(payload) > bound:
        raise Rejection(f"update is {len(payload)} bytes, over the {bound}-byte bound for this model", device, None, None)
    try:
        update = Update.decode(payload, num_params)
    except ProtocolError as exc:
        rnd, nonce = peek_meta(payload)
        raise Rejection(exc.reason, device, rnd, nonce) from None
    if update.device_id != device:
        raise Rejection(
            f"device_id {update.device_id!r} does not match the topic's device {device!r}", device, update.round, update.nonce
        )
    if authenticate is not None:
        # Equal to the topic's `device` (checked above); the meta's string is the one the round
        # keeps (accepted), so the ledger holds the same object, not a second copy per device.
        authenticate(update.device_id, update, version)  # raises Rejection: bad/missing signature, replay
    open_round = version.open_round
    if (
        update.round == open_round - 1
        and update.run_id == version.run_id
        and update.model_hash == version.model_hash
        and previous_accepted.get(device) == update.nonce
    ):
        return Verdict(update, duplicate=True, note=f"round {update.round} closed; this update was counted before it closed")
    reason = version.check_version(update.run_id, update.model_hash, update.round)
    if reason is not None:
        raise Rejection(reason, device, update.round, update.nonce)
    if invited is not None and not invited(device):
        raise Rejection(f"{device} was not invited to round {update.round}", device, update.round, update.nonce)
    prior = accepted.get(device)
    if prior is not None:
        if prior == update.nonce:
            return Verdict(update, duplicate=True, note="duplicate of an accepted update; counted once")
        raise Rejection(f"duplicate update for round {update.round}", device, update.round, update.nonce)
    return Verdict(update)

"""The fleet's leader lease: which aggregator run may publish rounds on a fleet.

Retained on `fleetlearn/<fleet>/leader` (JSON, a control message like the round state):

    {"v": 1, "state": "held", "run_id": "<32 hex>", "token": "<32 hex>", "holder": "host:pid",
     "claimed": 1700000000.0, "issued": 1700000000.0, "expires": 1700000030.0}

- `held`: the aggregator with `token` (one process; a fresh token per start) leads run `run_id`
  until `expires` (unix time), renewed every third of its time to live.
- `released`: that holder let go: its clean exit, or the MQTT Last Will the broker publishes
  when the holder's connection dies. A release only releases the holder it names.
- Two held leases of different holders (a zombie's renewal racing a takeover): the later claim
  wins (`claimed`, the time the holder first claimed, kept by its renewals; then the token).
- A lease message with `"probe"` instead of a state is an aggregator's read barrier (never
  retained): readers skip it.

`LeaseView` is what a reader keeps: the last lease that counts, deduplicated by
(token, issued) because a broker may deliver a retained message twice (amqtt 0.12.1 does).
A device follows the leader's run (`allows(run_id)`): global models and round states of any
other run are ignored while a lease names a run; before any lease is seen, every run is allowed
(an aggregator older than leases, or one that has not claimed yet, publishes nothing anyway).
Expiry is judged on the reader's wall clock against the holder's: keep clocks in sync (NTP).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import HEX32_RE, check_float, check_str, decode_json, encode_json

LEASE_STATES = ("held", "released")
HOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")  # "host:pid"; printable, bounded
MAX_LEASE_BYTES = 1024
MAX_TTL = 24 * 3600.0


@dataclass(frozen=True)
class Lease:
    state: str  # "held" | "released"
    run_id: str
    token: str  # one aggregator process
    holder: str  # for people: host:pid
    claimed: float  # unix time this holder claimed the fleet (its renewals keep it)
    issued: float  # unix time this message was written
    expires: float  # unix time a held lease lapses unless renewed

    def encode(self) -> bytes:
        return encode_json(
            {
                "state": self.state,
                "run_id": self.run_id,
                "token": self.token,
                "holder": self.holder,
                "claimed": self.claimed,
                "issued": self.issued,
                "expires": self.expires,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> Lease:
        doc = decode_json(payload, "lease", MAX_LEASE_BYTES)
        state = doc.get("state")
        if state not in LEASE_STATES:
            raise ProtocolError(f"lease: state {str(state)[:20]!r} is not one of {LEASE_STATES}")
        claimed = check_float(doc, "claimed", 0.0)
        issued = check_float(doc, "issued", claimed)
        expires = check_float(doc, "expires", 0.0)
        if not 0 <= expires - issued <= MAX_TTL:
            raise ProtocolError(f"lease: expires must be within {MAX_TTL:.0f}s after issued")
        return cls(
            state,
            check_str(doc, "run_id", HEX32_RE),
            check_str(doc, "token", HEX32_RE),
            check_str(doc, "holder", HOLDER_RE),
            claimed,
            issued,
            expires,
        )

    def held_at(self, now: float) -> bool:
        """Held and not expired at `now`."""
        return self.state == "held" and now < self.expires

    def beats(self, other: Lease) -> bool:
        """Between two holders' held leases, does this one win (the later claim)?"""
        return (self.claimed, self.token) > (other.claimed, other.token)

    def describe(self) -> str:
        return f"{self.holder} (run {self.run_id[:8]})"


def encode_probe(token: str) -> bytes:
    return encode_json({"probe": token})


def probe_token(payload: bytes) -> str | None:
    """The token of a read-barrier probe, or None when `payload` is no probe."""
    if b'"probe"' not in payload[:MAX_LEASE_BYTES]:
        return None
    try:
        doc = decode_json(payload, "lease probe", MAX_LEASE_BYTES)
    except ProtocolError:
        return None
    token = doc.get("probe")
    return token if isinstance(token, str) and HEX32_RE.fullmatch(token) else None


class LeaseView:
    """The last lease that counts, from the messages on the leader topic (hostile input)."""

    def __init__(self, remember: int = 64):
        self.current: Lease | None = None
        self._seen: deque[tuple[str, float]] = deque(maxlen=remember)

    def observe(self, payload: bytes) -> Lease | None:
        """Apply one message; returns the lease when it changed the view, else None.
        ProtocolError for a malformed lease (a probe or an empty payload is skipped)."""
        if not payload or probe_token(payload) is not None:
            return None
        lease = Lease.decode(payload)
        key = (lease.token, lease.issued)
        if key in self._seen:
            return None  # a retained message delivered again
        self._seen.append(key)
        cur = self.current
        if cur is not None and cur.state == "held" and cur.token != lease.token:
            if lease.state == "released":
                return None  # a stale holder's Last Will: it released nothing it still held
            if not lease.beats(cur):
                return None  # a superseded holder's late renewal
        self.current = lease
        return lease

    def allows(self, run_id: str) -> bool:
        """May a device act on a global model or round state of `run_id`?"""
        return self.current is None or self.current.run_id == run_id

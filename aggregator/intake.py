"""Updates in, acks out: validation, folding an accepted update into the strategy, and group
commit (nothing is acknowledged before it is durable).

An accepted update is folded in at once, but its ack (and its `update_accepted` log line) waits
for the next durable write: `commit_acks` persists the round's partial state once for every
update that arrived together (one fsync instead of one each), then acks them all; when those
updates reach the round's target, the round's own commit makes them durable and the engine
publishes their acks after it. A rejected update is answered at once (nothing to persist).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fleetlearn.aggregator.clipping import l2_norm
from fleetlearn.aggregator.events import Events
from fleetlearn.aggregator.model_store import ModelStore, PartialRound
from fleetlearn.aggregator.publisher import Publisher
from fleetlearn.aggregator.sampling import Cohort
from fleetlearn.aggregator.strategy import Strategy
from fleetlearn.aggregator.validation import UNKNOWN_NONCE, Rejection, max_update_bytes, validate_update
from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import PART_TIMEOUT_S, Ack, Reassembler, RoundConfig, Topics, Update, is_part


@dataclass
class RoundRun:
    """The open round in memory (its durable twin is model_store.PartialRound)."""

    round: int
    opened_at: float
    deadline: float
    config: RoundConfig
    accepted: dict[str, str] = field(default_factory=dict)  # device -> nonce
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0
    extensions: int = 0
    norms: NormStats = field(default_factory=lambda: NormStats())
    target: int = 0  # accepted updates that close the round
    cohort: Cohort | None = None  # with client sampling: who was invited (persisted with the round)


@dataclass
class NormStats:
    """Streaming telemetry of the accepted deltas' L2 norms (raw, before any clipping): two
    numbers and a sample count, whatever the device count.

        update_norm     = sum_i n_i ||d_i||_2 / sum_i n_i      (sample-weighted mean)
        update_norm_max = max_i ||d_i||_2
    """

    weighted_sum: float = 0.0
    samples: int = 0
    max: float = 0.0

    def add(self, norm: float, samples: int) -> None:
        self.weighted_sum += float(samples) * norm
        self.samples += int(samples)
        self.max = max(self.max, norm)

    def summary(self) -> dict[str, float]:
        """The record's fields ({} before the first accepted update)."""
        return {"update_norm": self.weighted_sum / self.samples, "update_norm_max": self.max} if self.samples else {}

    def to_doc(self) -> dict[str, Any]:
        return {"weighted_sum": self.weighted_sum, "samples": self.samples, "max": self.max}

    @classmethod
    def from_doc(cls, doc: Any) -> NormStats:
        if not doc:
            return cls()
        return cls(float(doc["weighted_sum"]), int(doc["samples"]), float(doc["max"]))


@dataclass(frozen=True)
class DueAck:
    """An accepted update whose ack (and `update_accepted` log line) waits for a durable write."""

    update: Update
    accepted: int  # accepted updates in the round once this one counted
    payload_bytes: int


class Intake:
    def __init__(
        self,
        topics: Topics,
        num_params: int,
        store: ModelStore,
        signing: Any,
        strategy: Strategy,
        publisher: Publisher,
        events: Events,
        target: int,
    ):
        self.topics = topics
        self.num_params = num_params
        self.store = store
        self.signing = signing
        self.strategy = strategy
        self.publisher = publisher
        self.events = events
        self.target = target
        self.acks_due: list[DueAck] = []
        # Updates over --max-message-size arrive as PART frames (protocol/parts.py): at most two
        # partial updates per device, each bounded by the model's largest update frame.
        self.parts = Reassembler(max_total=max_update_bytes(num_params), per_sender=2, max_partials=4096, timeout=PART_TIMEOUT_S)

    def on_update(self, run: RoundRun, topic: str, payload: bytes) -> None:
        run.bytes_in += len(payload)
        if is_part(payload):
            whole = self._reassemble(run, topic, payload)
            if whole is None:
                return
            payload = whole
        try:
            verdict = validate_update(
                topic,
                payload,
                topics=self.topics,
                num_params=self.num_params,
                version=self.store,
                accepted=run.accepted,
                previous_accepted=self.store.last_accepted,
                authenticate=self.signing.authenticate,
                invited=run.cohort.invitation.invites if run.cohort is not None else None,
            )
        except Rejection as rej:
            self.reject(run, rej)
            return
        u = verdict.update
        if verdict.duplicate:
            self.events.log("update_duplicate", u.round, device=u.device_id, nonce=u.nonce[:8], note=verdict.note)
            if any(d.update.device_id == u.device_id and d.update.nonce == u.nonce for d in self.acks_due):
                return  # counted but not yet durable: its ack is already due with the next write
            run.bytes_out += self.publisher.ack(Ack(self.store.run_id, u.round, u.device_id, u.nonce, True, verdict.note))
            return
        try:
            self.strategy.accumulate(u)
        except ProtocolError as exc:  # the strategy refused it (e.g. a robust bound)
            self.reject(run, Rejection(exc.reason, u.device_id, u.round, u.nonce))
            return
        run.accepted[u.device_id] = u.nonce
        run.norms.add(l2_norm(u.delta), u.samples)
        # Durable before the ack: an aggregator killed after acking loses nothing. The ack is
        # due with the next durable write (commit_acks, or the round's commit at close).
        self.acks_due.append(DueAck(u, len(run.accepted), len(payload)))

    def _reassemble(self, run: RoundRun, topic: str, payload: bytes) -> bytes | None:
        """The whole update once its last part is in; a refused part costs one rejection."""
        try:
            device = self.topics.device_of(topic, "update")
        except ProtocolError as exc:
            self.reject(run, Rejection(exc.reason, None, None, None))
            return None
        try:
            return self.parts.feed(device, payload, time.monotonic())
        except ProtocolError as exc:
            self.reject(run, Rejection(f"update part: {exc.reason}", device, None, None))
            return None

    def reject(self, run: RoundRun, rej: Rejection) -> None:
        run.rejected += 1
        rnd = rej.round if rej.round is not None else run.round
        self.events.emit("update_rejected", rnd, device=rej.device or "?", level=logging.WARNING, reason=rej.reason)
        if rej.device is not None:
            run.bytes_out += self.publisher.ack(
                Ack(self.store.run_id, rnd, rej.device, rej.nonce or UNKNOWN_NONCE, False, rej.reason)
            )

    # ------------------------------------------------------------ durability, then acks

    def save_partial(self, run: RoundRun) -> None:
        self.store.save_partial(
            PartialRound(
                run_id=self.store.run_id,
                round=run.round,
                accepted=dict(run.accepted),
                strategy=self.strategy.partial_state(),
                opened_at=run.opened_at,
                bytes_in=run.bytes_in,
                bytes_out=run.bytes_out,
                rejected=run.rejected,
                extensions=run.extensions,
                norms=run.norms.to_doc(),
                cohort=run.cohort.to_doc() if run.cohort is not None else {},
            )
        )

    def commit_acks(self, run: RoundRun) -> None:
        """Persist the round's partial state once, then ack every update it now holds."""
        if not self.acks_due:
            return
        self.save_partial(run)
        self.send_due_acks(run)

    def send_due_acks(self, run: RoundRun) -> None:
        self.publish_acks(self.encode_due_acks(run))

    def encode_due_acks(self, run: RoundRun) -> list[tuple[DueAck, Ack]]:
        """The due acks, counted in the round's bytes out (taken off the due list)."""
        due, self.acks_due = self.acks_due, []
        out = [(d, Ack(self.store.run_id, d.update.round, d.update.device_id, d.update.nonce, True)) for d in due]
        run.bytes_out += sum(len(a.encode()) for _, a in out)
        return out

    def publish_acks(self, acks: list[tuple[DueAck, Ack]]) -> None:
        """Ack durable updates; `update_accepted` is logged here, so the log never claims an
        update that a crash could still lose."""
        for due, ack in acks:
            u = due.update
            self.publisher.ack(ack)
            self.events.emit(
                "update_accepted",
                u.round,
                device=u.device_id,
                samples=u.samples,
                train_loss=u.train_loss,
                train_s=u.train_s,
                accepted=due.accepted,
                target=self.target,
                bytes=due.payload_bytes,
            )  # engine sets target per round

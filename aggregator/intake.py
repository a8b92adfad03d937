"""Updates in, acks out: validation, folding an accepted update into the strategy, and group
commit (nothing is acknowledged before it is durable).

An accepted update is folded in at once, but its ack (and its `update_accepted` log line) waits
for the next durable write of the round's partial state, which covers every update accepted
since the write before it (one fsync for many updates):

    on_update        validate, fold in, and put the ack on `acks_due`
    commit_acks      no write pending: snapshot the partial state (engine thread, a consistent
                     copy), move `acks_due` to `in_flight`, hand the snapshot to the commit writer
                     (aggregator/commit_writer.py: one thread writes partials and round commits,
                     in submission order)
    on_durable       (engine thread, when the writer reports the job done) ack `in_flight`; the
                     engine's next commit_acks starts the write of whatever arrived meanwhile

So the engine keeps validating and folding while the disk works (an fsync costs 5-50 ms on this
VM), and the longer a write takes, the more updates the next one covers. Because the writer
runs its jobs in order, a partial of round r+1 is durable only after round r's commit: no update
of round r+1 is acknowledged before round r is durable. When the updates reach the round's
target, the round's own commit (queued after any partial write) makes the rest durable and the
engine publishes their acks after it. A rejected update is answered at once (nothing to persist).
Durable acks reach paho at most ACK_WINDOW ahead of the broker's PUBACKs (pump_acks); the rest
wait here, encoded, instead of in paho's queue.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetlearn.aggregator.clipping import l2_norm
from fleetlearn.aggregator.commit_writer import CommitWriter, Job
from fleetlearn.aggregator.events import Events
from fleetlearn.aggregator.fold import new_scratch
from fleetlearn.aggregator.model_store import ModelStore, PartialRound
from fleetlearn.aggregator.partial_round import AcceptedJson
from fleetlearn.aggregator.publisher import Publisher
from fleetlearn.aggregator.sampling import Cohort
from fleetlearn.aggregator.strategy import Strategy
from fleetlearn.aggregator.validation import UNKNOWN_NONCE, Rejection, max_update_bytes, validate_update
from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import PART_TIMEOUT_S, Ack, Reassembler, RoundConfig, Topics, Update, is_part

# Our QoS 1 messages awaiting their PUBACK past which acks wait in Intake (pump_acks), not in paho.
ACK_WINDOW = 256


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
    global_bytes: int = 0  # the global-model frame(s) that opened the round: what each device receives


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


@dataclass(frozen=True, slots=True)
class DueAck:
    """An accepted update whose ack (and `update_accepted` log line) waits for a durable write:
    what the ack and the log line say, not the update (its delta and frame are folded in and
    gone: a backlog of due acks costs ~200 bytes each, not two copies of the model)."""

    device: str
    round: int
    nonce: str
    samples: int
    train_loss: float
    train_s: float
    accepted: int  # accepted updates in the round once this one counted
    payload_bytes: int
    note: str = ""  # set for an accepted duplicate (counted before): the ack's reason, no update_accepted line

    @classmethod
    def of(cls, u: Update, accepted: int, payload_bytes: int, note: str = "") -> DueAck:
        return cls(u.device_id, u.round, u.nonce, u.samples, u.train_loss, u.train_s, accepted, payload_bytes, note)


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
        writer: CommitWriter,
    ):
        self.topics = topics
        self.num_params = num_params
        self.store = store
        self.signing = signing
        self.strategy = strategy
        self.publisher = publisher
        self.events = events
        self.target = target
        self.acks_due: list[DueAck] = []  # accepted, in no durable write yet
        self.in_flight: list[DueAck] = []  # accepted, in the write running on the writer thread
        self._unacked: set[tuple[str, str]] = set()  # (device, nonce) of acks_due + in_flight
        self.writer = writer  # the one thread writing the aggregator's state, in order
        self._write: Job | None = None  # the partial write whose completion acks `in_flight`
        self._accepted_json = AcceptedJson()  # each write encodes only the newly accepted pairs
        self._held: deque[tuple[DueAck, bytes]] = deque()  # durable acks not handed to paho yet (pump_acks)
        self._scratch = new_scratch()  # l2_norm's float64 block buffer, reused (not 1 MB per update)
        # Updates over --max-message-size arrive as PART frames (protocol/parts.py): at most two
        # partial updates per device, each bounded by the model's largest update frame.
        self.parts = Reassembler(max_total=max_update_bytes(num_params), per_sender=2, max_partials=4096, timeout=PART_TIMEOUT_S)

    def on_update(self, run: RoundRun, topic: str, payload: bytes) -> None:
        if self._held:
            self.pump_acks()
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
            if (u.device_id, u.nonce) in self._unacked:
                return  # counted but not yet durable: its ack is already due with the next write
            if u.round > self.store.durable_round:  # its round's commit is still being written
                self.acks_due.append(DueAck.of(u, len(run.accepted), len(payload), verdict.note))
                self._unacked.add((u.device_id, u.nonce))
                return
            self.signing.flush()  # the replay ledger's entries before any verdict leaves
            run.bytes_out += self.publisher.ack(Ack(self.store.run_id, u.round, u.device_id, u.nonce, True, verdict.note))
            return
        try:
            self.strategy.accumulate(u)
        except ProtocolError as exc:  # the strategy refused it (e.g. a robust bound)
            self.reject(run, Rejection(exc.reason, u.device_id, u.round, u.nonce))
            return
        run.accepted[u.device_id] = u.nonce
        run.norms.add(l2_norm(u.delta, self._scratch), u.samples)
        # Durable before the ack: an aggregator killed after acking loses nothing. The ack is
        # due with the next durable write (commit_acks, or the round's commit at close).
        self.acks_due.append(DueAck.of(u, len(run.accepted), len(payload)))
        self._unacked.add((u.device_id, u.nonce))

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
            self.signing.flush()  # the replay ledger's entries before any verdict leaves
            run.bytes_out += self.publisher.ack(
                Ack(self.store.run_id, rnd, rej.device, rej.nonce or UNKNOWN_NONCE, False, rej.reason)
            )

    # ------------------------------------------------------------ durability, then acks

    def _partial(self, run: RoundRun) -> PartialRound:
        """The round's partial state now, as a copy the engine may go on changing."""
        return PartialRound(
            run_id=self.store.run_id,
            round=run.round,
            accepted=dict(run.accepted),
            strategy=_frozen(self.strategy.partial_state()),
            opened_at=run.opened_at,
            bytes_in=run.bytes_in,
            bytes_out=run.bytes_out,
            rejected=run.rejected,
            extensions=run.extensions,
            norms=run.norms.to_doc(),
            cohort=run.cohort.to_doc() if run.cohort is not None else {},
            accepted_json=self._accepted_json.of(run.round, run.accepted),
        )

    def save_partial(self, run: RoundRun) -> Job:
        """Write the round's partial state now, whatever is due (e.g. a deadline extension's
        count): every accepted update not acked yet goes with this write; on_durable acks them."""
        self.in_flight, self.acks_due = self.in_flight + self.acks_due, []
        self._write = self.writer.partial(run.round, self._partial(run), None)
        return self._write

    def commit_acks(self, run: RoundRun) -> None:
        """Make the updates accepted since the last write durable, in the background; their acks
        follow on_durable."""
        self.pump_acks()
        if not self.acks_due or self._write is not None:
            return  # nothing new, or a write is pending: its completion starts the next
        self.save_partial(run)

    def on_durable(self, run: RoundRun | None, job: Job) -> None:
        """The writer finished partial `job` (engine thread; the engine raised a failed job's
        error before this): ack what it made durable. A superseded job (the round's close, or a
        later save_partial, took its acks) is ignored."""
        if job is not self._write:
            return
        self._write = None
        if run is not None:
            due, self.in_flight = self.in_flight, []
            self.publish_acks(self._encode(run, due))

    def send_due_acks(self, run: RoundRun) -> None:
        """Ack every due update (the caller made them durable: save_partial, the round's commit)."""
        self.publish_acks(self.encode_due_acks(run))

    def encode_due_acks(self, run: RoundRun) -> list[tuple[DueAck, bytes]]:
        """Every accepted update's ack not sent yet (in a pending write or not), encoded and
        counted in the round's bytes out, taken off the due lists. The caller publishes them
        after a later durable write (the round's commit, queued behind any pending partial)."""
        due, self.acks_due, self.in_flight, self._write = self.in_flight + self.acks_due, [], [], None
        return self._encode(run, due)

    def _encode(self, run: RoundRun, due: list[DueAck]) -> list[tuple[DueAck, bytes]]:
        out = [(d, Ack(self.store.run_id, d.round, d.device, d.nonce, True, d.note).encode()) for d in due]
        run.bytes_out += sum(len(a) for _, a in out)
        self._unacked.difference_update((d.device, d.nonce) for d in due)
        return out

    def publish_acks(self, acks: list[tuple[DueAck, bytes]]) -> None:
        """Ack durable updates; `update_accepted` is logged here, so the log never claims an
        update that a crash could still lose. The acks go to paho through `pump_acks`."""
        self.signing.flush()  # the replay ledger's entries before any verdict leaves
        self._held.extend(acks)
        self.pump_acks()
        for due, _ in acks:
            if due.note:
                continue  # a duplicate: its update_accepted line was written when it first counted
            self.events.emit(
                "update_accepted",
                due.round,
                device=due.device,
                samples=due.samples,
                train_loss=due.train_loss,
                train_s=due.train_s,
                accepted=due.accepted,
                target=self.target,
                bytes=due.payload_bytes,
            )  # engine sets target per round

    def pump_acks(self, everything: bool = False) -> None:
        """Hand held acks (durable, encoded) to paho, in order, while fewer than ACK_WINDOW of our
        QoS 1 messages await their PUBACK; `everything`: all of them (before the link's last flush).

        Why hold them: paho keeps each QoS 1 message (~2 KB with its own Condition) until its
        PUBACK and queues whatever exceeds its 100 in flight, so a burst of acks (a group commit,
        a round's close) held memory growing with the fleet (bench_ingest, 4,000 devices: ~2,000
        acks queued in paho at the close). Held here an ack costs its encoded ~200 bytes. Called
        with each update (on_update) and each turn of the engine's loop (commit_acks: at least
        every 0.5 s while a round is open), and with `everything` before the engine's last flush."""
        if not self._held:
            return
        room = len(self._held) if everything else ACK_WINDOW - self.publisher.link.unacknowledged()
        while room > 0 and self._held:
            due, ack = self._held.popleft()
            self.publisher.publish(self.topics.ack(due.device), ack)
            room -= 1


def _frozen(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a strategy's partial state (a depth-1 dict of JSON values and arrays) that the
    strategy's next accumulate cannot change while the writer thread encodes it."""
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else copy.deepcopy(v)) for k, v in state.items()}

"""Closing a round (and what can end one early): the second half of the round engine.

`RoundClosing` is a mixin of `engine.Aggregator`, kept in its own file so each file has one job:
drawing a sampled round's cohort, extending a round past a missed deadline, failing it, closing
it and finishing the run. The attributes it uses are the engine's, declared below for the type
checker.

Closing round r is split so that nothing slow sits between round r's last update and round
r+1's global model:

    _close_round     aggregate -> server step -> store.advance (memory): w_r is current
    (engine)         round r+1's global model is published
    _settle_closing  RoundState closed -> evaluation -> the commit handed to the writer thread
    _finish_durable  once the writer made it durable: round r's acks, metrics, round_closed

Partial accumulators (acks of an open round) go through the same writer, in order
(intake.Intake.commit_acks), so the engine's thread never waits for an fsync and no update of round
r+1 is acknowledged before round r is durable (aggregator/commit_writer.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator.commit_writer import CommitWriter
from fleetlearn.aggregator.config import AggregatorConfig
from fleetlearn.aggregator.evaluation import Evaluator
from fleetlearn.aggregator.events import Events
from fleetlearn.aggregator.inbox import Inbox
from fleetlearn.aggregator.intake import DueAck, Intake, RoundRun
from fleetlearn.aggregator.model_store import ModelStore, PendingCommit
from fleetlearn.aggregator.presence import Presence
from fleetlearn.aggregator.publisher import Publisher
from fleetlearn.aggregator.sampling import Cohort, draw_cohort
from fleetlearn.aggregator.strategy import Strategy
from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.protocol import GlobalModel, RoundMetrics, RoundState

# With client sampling, the first round after start, and a round with fewer connected devices than
# it would invite, wait this long for more (statuses arriving, devices connecting) before drawing.
SAMPLING_SETTLE_S = 2.0
# Round commits queued or being written before a closing round waits for the writer (a backlog
# means the disk is slower than the rounds; each commit group writes all that queued at once).
MAX_COMMITS_IN_FLIGHT = 4

log = logging.getLogger("fleetlearn.aggregator")


@dataclass
class Closing:
    """Round r between `_close_round` (aggregated, current in memory) and the writer."""

    run: RoundRun
    pending: PendingCommit
    record: dict[str, Any]
    acks: list[tuple[DueAck, Any]]
    weights: np.ndarray


class RoundFailed(Exception):
    pass


class Stopped(Exception):
    pass


class RoundClosing:
    config: AggregatorConfig
    presence: Presence
    events: Events
    intake: Intake
    strategy: Strategy
    store: ModelStore
    evaluator: Evaluator
    publisher: Publisher
    manifest: Manifest
    state_dir: Path
    current: RoundRun | None
    writer: CommitWriter
    _closing: Closing | None
    _queue: Inbox
    _stop: threading.Event
    _cohorts_drawn: int

    # The engine's (engine.Aggregator overrides all three).
    def _round_state(self, state: str, reason: str = "", rnd: int | None = None) -> None:
        raise NotImplementedError

    def _handle_next_event(self, timeout: float) -> None:
        raise NotImplementedError

    def _flush(self, timeout: float) -> bool:
        raise NotImplementedError

    def _draw_cohort(self, run: RoundRun) -> Cohort:
        """Client sampling: wait (handling events, so statuses arrive) until enough devices are
        connected, then draw round `run`'s cohort among them (aggregator/sampling.py). Updates that
        arrive meanwhile are not handled (self.current is None): a device re-sends on the global model."""
        pol, smp = self.config.rounds, self.config.sampling
        need = smp.need(pol.min_devices)
        started, give_up = time.monotonic(), time.time() + pol.deadline * (pol.max_extensions + 1)
        waiting_logged = False
        while True:
            n = len(self.presence.connected())
            # The first draw after start waits the settle time in any case: the retained statuses of
            # a large fleet arrive over a while after the subscription. Later draws know the fleet.
            full = self._cohorts_drawn > 0 and smp.sample_size is not None and n >= smp.wanted(smp.sample_size)
            if full or (n >= need and time.monotonic() - started >= SAMPLING_SETTLE_S):
                break
            if time.time() >= give_up:
                self._fail(
                    run,
                    f"round {run.round} failed: {n} devices are connected and a sample needs {need}, after {pol.deadline * (pol.max_extensions + 1):g}s",
                    connected=n,
                    need=need,
                )
            if not waiting_logged and n < need:
                self.events.log("waiting_for_devices", run.round, connected=n, need=need)
                waiting_logged = True
            self._handle_next_event(0.2)
            for _ in range(10_000):  # the retained statuses arrive as one burst: count them all first
                if self._queue.empty():
                    break
                self._handle_next_event(0.0)
            if self._stop.is_set():
                raise Stopped()
        self._cohorts_drawn += 1
        seed = smp.sample_seed if smp.sample_seed is not None else self.store.run_id
        return draw_cohort(self.presence.connected(), run.round, seed, smp, pol.min_devices)

    def _fail(self, run: RoundRun, reason: str, **fields: Any) -> None:
        """Round `run` failed: say so on the wire, in the log and to the callback, then stop."""
        self._round_state("failed", reason=reason)
        self.events.emit("round_failed", run.round, level=logging.ERROR, **fields, reason=reason)
        raise RoundFailed(reason)

    def _deadline_missed(self, run: RoundRun) -> None:
        pol = self.config.rounds
        k = len(run.accepted)
        if run.extensions >= pol.max_extensions:
            reason = (
                f"round {run.round} failed: {k} of the {pol.min_devices} devices needed sent an accepted update "
                f"within {pol.deadline:g}s and {pol.max_extensions} extension(s)"
            )
            self._fail(run, reason, accepted=k, min_devices=pol.min_devices, extensions=run.extensions)
        run.extensions += 1
        run.deadline = time.time() + pol.deadline
        self.intake.save_partial(run)  # the extension count too; rare, so wait for it
        self.writer.wait_idle()
        self._finish_durable()
        self._round_state("open")
        self.events.emit(
            "round_extended",
            run.round,
            level=logging.WARNING,
            accepted=k,
            min_devices=pol.min_devices,
            extension=run.extensions,
            max_extensions=pol.max_extensions,
            deadline=run.deadline,
            reason=f"only {k} of {pol.min_devices} required devices answered by the deadline",
        )

    def _close_round(self, run: RoundRun, closed_by: str) -> None:
        """Aggregate round `run` and make w_r current in memory; the rest waits for the next
        round's global model to be out (`_settle_closing`)."""
        k = len(run.accepted)
        new_w = self.strategy.step(self.store.weights, self.strategy.aggregate())
        if not np.isfinite(new_w).all():
            # Finite deltas can still overflow float32 when summed; never publish such a model.
            self._fail(run, f"round {run.round} failed: the aggregated model holds NaN/Inf values", accepted=k)
        closed_at = time.time()
        acks = self.intake.encode_due_acks(run)  # sent once the round's commit has made them durable
        record: dict[str, Any] = {
            "round": run.round,
            "run_id": self.store.run_id,
            "devices": sorted(run.accepted),
            "accepted": k,
            **self.strategy.round_summary(),
            **run.norms.summary(),
        }
        if run.cohort is not None:
            record.update(invited=list(run.cohort.invited), connected=run.cohort.connected)
        if run.config.proximal_mu:
            record["proximal_mu"] = run.config.proximal_mu  # the strategy names the aggregation; mu is the devices' side
        record.update(
            wall_s=round(closed_at - run.opened_at, 4),
            bytes_in=run.bytes_in,
            bytes_out=run.bytes_out,
            global_bytes=run.global_bytes,
            deadline_extensions=run.extensions,
            rejected=run.rejected,
            closed_by=closed_by,
            strategy=self.strategy.name,
            opened_at=run.opened_at,
            closed_at=closed_at,
        )
        if self.writer.commits_in_flight() >= MAX_COMMITS_IN_FLIGHT:
            self.writer.wait_below(MAX_COMMITS_IN_FLIGHT)
        # Weights and the strategy's cross-round state become current together (durable later, together).
        pending = self.store.advance(run.round, new_w, run.accepted, self.strategy.state_dict())
        self._closing = Closing(run, pending, record, acks, new_w)
        self.current = None

    def _settle_closing(self) -> None:
        """The closed round's state on the wire, its evaluation, and its commit to the writer."""
        c, self._closing = self._closing, None
        if c is None:
            return
        pol = self.config.rounds
        self.publisher.round_state(
            RoundState(
                run_id=self.store.run_id,
                round=c.run.round,
                state="closed",
                total_rounds=pol.rounds,
                min_devices=pol.min_devices,
                target_devices=c.run.target,
                accepted=len(c.run.accepted),
            )
        )
        c.record.update(self.evaluator.evaluate(c.weights))
        record = _finite(c.record)
        c.pending.record = RoundMetrics.from_doc(record).to_doc()  # rounds.jsonl holds only valid records
        self.writer.commit(c.pending, (record, c.acks))

    def _finish_durable(self) -> None:
        """What the writer made durable: publish the acks (and a closed round's metrics and
        round_closed event) that waited for it. A failed write is raised here: nothing after
        it is acknowledged."""
        for job in self.writer.done():
            if job.error is not None:
                raise job.error
            if job.kind == "partial":
                self.intake.on_durable(self.current, job)
                continue
            record, acks = job.payload
            self.intake.publish_acks(acks)  # the commit made every accepted update of the round durable
            self.publisher.metrics(record)
            metric = {k_: record[k_] for k_ in ("test_mse", "test_accuracy") if k_ in record}
            self.events.emit(
                "round_closed",
                record["round"],
                notify=record,
                closed_by=record["closed_by"],
                accepted=record["accepted"],
                devices=record["devices"],
                samples=record.get("samples"),
                train_loss=record.get("train_loss"),
                wall_s=record["wall_s"],
                **metric,
            )

    def _shutdown_writes(self) -> None:
        """At exit, whatever ended the run: the last closed round committed, every write
        finished and its acks out, the writer thread ended."""
        if self.writer is None:
            return
        try:
            if self.store is not None and self._closing is not None:
                self._settle_closing()
            if not self.writer.wait_idle(60.0):
                log.error("event=commit_timeout round=- reason=the durable writes did not finish within 60s")
            self._finish_durable()
        except Exception as exc:  # the run is ending anyway: say why, once
            log.error("event=commit_failed round=- error=%r", f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self.writer.close()

    def _finish(self) -> None:
        pol = self.config.rounds
        store = self.store
        self._settle_closing()
        self.writer.wait_idle()
        self._finish_durable()  # the last round durable, its acks and round_closed before `finished`
        final = store.weights
        self.publisher.global_model(
            GlobalModel(
                store.run_id, store.round + 1, self.manifest.model_hash, final, train=False, total_rounds=pol.rounds, deadline=0.0
            )
        )
        self._round_state("finished", rnd=store.round + 1)
        out = self.state_dir / "model.onnx"
        self.evaluator.export_final(final, out)
        self._flush(10.0)
        self.events.emit("finished", store.round, rounds=store.round, model=str(out), run_id=store.run_id)


def _finite(doc: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: a non-finite float becomes null."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in doc.items()}

"""Closing a round (and what can end one early): the second half of the round engine.

`RoundClosing` is a mixin of `engine.Aggregator`, kept in its own file so each file has one job:
drawing a sampled round's cohort, extending a round past a missed deadline, failing it, closing
it (aggregate -> server step -> evaluate -> one durable commit -> acks -> metrics) and finishing
the run. The attributes it uses are the engine's, declared below for the type checker.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator.config import AggregatorConfig
from fleetlearn.aggregator.evaluation import Evaluator
from fleetlearn.aggregator.events import Events
from fleetlearn.aggregator.inbox import Inbox
from fleetlearn.aggregator.intake import Intake, RoundRun
from fleetlearn.aggregator.model_store import ModelStore
from fleetlearn.aggregator.presence import Presence
from fleetlearn.aggregator.publisher import Publisher
from fleetlearn.aggregator.sampling import Cohort, draw_cohort
from fleetlearn.aggregator.strategy import Strategy
from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.protocol import GlobalModel

# With client sampling, the first round after start, and a round with fewer connected devices than
# it would invite, wait this long for more (statuses arriving, devices connecting) before drawing.
SAMPLING_SETTLE_S = 2.0


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
        self.intake.save_partial(run)
        self.intake.send_due_acks(run)
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
        k = len(run.accepted)
        self._round_state("closed")
        new_w = self.strategy.step(self.store.weights, self.strategy.aggregate())
        if not np.isfinite(new_w).all():
            # Finite deltas can still overflow float32 when summed; never publish such a model.
            self._fail(run, f"round {run.round} failed: the aggregated model holds NaN/Inf values", accepted=k)
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
        acks = self.intake.encode_due_acks(run)  # sent once the commit below has made them durable
        record.update(self.evaluator.evaluate(new_w))
        closed_at = time.time()
        record.update(
            wall_s=round(closed_at - run.opened_at, 4),
            bytes_in=run.bytes_in,
            bytes_out=run.bytes_out,
            deadline_extensions=run.extensions,
            rejected=run.rejected,
            closed_by=closed_by,
            strategy=self.strategy.name,
            opened_at=run.opened_at,
            closed_at=closed_at,
        )
        record = _finite(record)
        # Weights and the strategy's cross-round state become current in one commit.
        self.store.commit(run.round, new_w, record, run.accepted, self.strategy.state_dict())
        self.intake.publish_acks(acks)  # the commit made every accepted update of the round durable
        self.publisher.metrics(record)
        metric = {k_: record[k_] for k_ in ("test_mse", "test_accuracy") if k_ in record}
        self.events.emit(
            "round_closed",
            run.round,
            notify=record,
            closed_by=closed_by,
            accepted=k,
            devices=record["devices"],
            samples=record.get("samples"),
            train_loss=record.get("train_loss"),
            wall_s=record["wall_s"],
            **metric,
        )
        self.current = None

    def _finish(self) -> None:
        pol = self.config.rounds
        store = self.store
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

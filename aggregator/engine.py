"""The round engine: opens rounds, folds accepted updates in, closes, evaluates, persists.

    config = AggregatorConfig(broker="mqtt://127.0.0.1:1883", state_dir=Path("runs/a"),
                              bundle=Path("bundles/boston"), rounds=RoundPolicy(5, min_devices=2))
    code = Aggregator(config).run()     # 0 done, 3 a round failed, 130/143 stopped
    # or run_aggregator(config)

Shape (as in the device agent): MQTT callbacks only put events on a queue; the thread that
called run() owns all state and handles one event at a time. Nothing a message holds can
stop the loop: a bad update costs one log line and one negative ack (aggregator/intake.py).

Round state machine (docs/aggregator.md has the picture):

    open(r) --target reached----------------------------> closed(r) -> open(r+1) ... finished
    open(r) --deadline, >= min accepted-----------------> closed(r)
    open(r) --deadline, < min, extensions left----------> open(r) (deadline + D, logged)
    open(r) --deadline, < min, no extensions left-------> failed(r)  (exit 3)

Who does what: config.py (options), schedule.py (each round's training config), registry.py
(the strategy), sampling.py + presence.py (who is invited, among the connected devices),
intake.py (validating updates, group-commit acks), round_close.py (drawing a cohort, extending,
failing and closing a round), publisher.py (the wire), evaluation.py (test metrics, final model), model_store.py (durability),
commit_writer.py (the durable writes, off the critical path), events.py (log + notify).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from fleetlearn.aggregator.config import AggregatorConfig
from fleetlearn.aggregator.events import EventCallback, Events, log
from fleetlearn.aggregator.inbox import Event, Inbox
from fleetlearn.aggregator.intake import Intake, NormStats, RoundRun
from fleetlearn.aggregator.logs import kv
from fleetlearn.aggregator.round_close import RoundClosing, RoundFailed, Stopped
from fleetlearn.aggregator.sampling import Cohort
from fleetlearn.aggregator.validation import max_update_bytes
from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.protocol import GlobalModel, RoundState, Topics

EXIT_OK = 0
EXIT_FLEET_LOST = 2  # another aggregator took the fleet over while this one ran
EXIT_ROUND_FAILED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# The backlog of received frames the engine has not handled yet is bounded (aggregator/inbox.py):
# at least this many bytes, and room for 4 of the model's largest update frames.
INBOX_BYTES = 4 << 20
DRAIN_BATCH = 256  # events handled between two group commits at most


class Aggregator(RoundClosing):
    """One aggregator run. `run()` blocks; `stop()` (any thread) ends it at the next event.

    `on_event(name, fields)`, when given, is called from run()'s thread for the events in
    events.NOTIFIED: round_open, update_accepted, update_rejected, round_extended,
    round_closed (fields: the round's record), round_failed, finished (and device_status when
    `watch_devices` is set).
    """

    def __init__(self, config: AggregatorConfig, on_event: EventCallback | None = None):
        self.config = config
        self.events = Events(on_event)
        self.exit_reason = ""
        self._queue = Inbox(INBOX_BYTES)  # network thread -> this one
        self._stop = threading.Event()
        self._stop_code = EXIT_SIGTERM
        self._connects = 0
        self._cohorts_drawn = 0
        self.link: Any = None
        self.leader: Any = None  # the LeaseKeeper (aggregator/leader.py) once the fleet is claimed
        self.store: Any = None
        self.writer: Any = None  # the CommitWriter (aggregator/commit_writer.py) once the store is open
        self.current: RoundRun | None = None
        self._closing: Any = None  # round_close.Closing: a round aggregated, its commit not yet handed to the writer
        self._first_round = 0  # the first round this process opens (it may resume a partial)
        # Subscribe to the devices' retained statuses and emit `device_status` events (for a
        # metrics exporter, aggregator/metrics.py); off by default: a large fleet's statuses cost bandwidth.
        self.watch_devices = False

    # ------------------------------------------------------------------ public

    def stop(self, code: int = EXIT_SIGTERM) -> None:
        """End the run within half a second. Safe from a signal handler: it only sets a flag
        (putting on the event queue there could deadlock on the queue's lock)."""
        self._stop_code = code
        self._stop.set()

    def run(self) -> int:
        cfg = self.config
        cfg.validate()
        self.topics = Topics(cfg.fleet)
        self._setup()
        try:
            self._connect()
            self.publisher.bundle(self.plan)
            self._first_round = self.store.open_round
            for rnd in range(self.store.open_round, cfg.rounds.rounds + 1):
                opened = time.monotonic()
                self._run_round(rnd)
                if cfg.rounds.round_interval > 0:
                    self._settle_closing()  # paced: the round's close need not wait for the next opening
                # --round-interval paces the run (demos watched by a person); 0 by default.
                if self._stop.wait(max(0.0, cfg.rounds.round_interval - (time.monotonic() - opened))) or self._stop.is_set():
                    return self._stopped()
            self._queue.close()  # no round left to take updates: never hold the network thread back
            self._finish()
            return EXIT_OK
        except RoundFailed as exc:
            self.exit_reason = str(exc)
            return EXIT_ROUND_FAILED
        except Stopped:
            return self._stopped()
        finally:
            self._queue.close()  # the network thread must not wait on a backlog nobody drains
            self._shutdown_writes()  # the last round's commit and every pending write finish; their acks out
            self._flush(5.0)
            if self.leader is not None:
                self.leader.release()
            if self.link is not None:
                self.link.stop()

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        from fleetlearn.aggregator.distribution import plan_bundle
        from fleetlearn.aggregator.evaluation import Evaluator
        from fleetlearn.aggregator.model_store import ModelStore, StateError
        from fleetlearn.aggregator.signing import open_signing
        from fleetlearn.edge_runtime.core.bundle import load_bundle

        cfg = self.config
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.bundle_dir = Path(cfg.bundle)
        self.manifest = load_bundle(self.bundle_dir)
        if cfg.training.proximal_mu and not self.manifest.proximal:  # every device would sit every round out
            raise UsageError(
                f"--proximal-mu needs a bundle with FedProx's proximal term; {self.bundle_dir} was exported without it (re-export without --no-proximal)"
            )
        self.plan = plan_bundle(self.bundle_dir, self.manifest, cfg.wire.bundle_chunk_size(cfg.chunk_size))
        self.evaluator = Evaluator(self.bundle_dir, self.manifest, cfg.test_data)
        self.store = ModelStore.open(
            self.state_dir, self.manifest.model_hash, self.manifest.num_params, self.evaluator.initial_weights
        )
        from fleetlearn.aggregator.commit_writer import CommitWriter

        self.writer = CommitWriter(self.store, notify=lambda: self._queue.put_control("durable"))
        s = cfg.signing
        self.signing = open_signing(
            self.state_dir,
            self.store.run_id,
            self.store.open_round,
            signing_key=s.signing_key,
            device_keys=s.device_keys,
            require=s.require_signatures,
        )
        self.strategy = cfg.strategy.build(cfg.round_target)
        try:
            self.strategy.load_state_dict(self.store.server_state)
        except ValueError as exc:
            raise StateError(f"{self.state_dir}: {exc}; use the run's --strategy or a fresh --state-dir") from None
        self.bundle_lr = float(self.manifest.optimizer.get("lr", 1e-3))
        self.events.log(
            "aggregator_start",
            None,
            run_id=self.store.run_id,
            resumed_after=self.store.round,
            rounds=cfg.rounds.rounds,
            model=self.manifest.model_name,
            model_hash=self.manifest.model_hash[:12],
            params=self.manifest.num_params,
            fleet=cfg.fleet,
            broker=cfg.link.url,
            min_devices=cfg.rounds.min_devices,
            target_devices=cfg.round_target,
            strategy=self.strategy.name,
            proximal_mu=cfg.training.proximal_mu or 0,
            sampling=cfg.sampling.to_log() if cfg.sampling.enabled else "off",
        )

    def _connect(self) -> None:
        from fleetlearn.aggregator.config import aggregator_client_id
        from fleetlearn.aggregator.leader import LeaseKeeper
        from fleetlearn.aggregator.presence import Presence
        from fleetlearn.aggregator.publisher import Publisher
        from fleetlearn.edge_runtime.core.mqtt import MqttLink

        cfg = self.config
        self.presence = Presence(self.topics)
        link = aggregator_client_id(cfg.link, cfg.fleet, self.store.run_id)
        # One writer per fleet: claim it before publishing anything (LeaderError, exit 2, if another leads).
        self.leader = LeaseKeeper(
            link, self.topics, self.store.run_id, cfg.lease, self.events, self._fleet_lost, cfg.connect_timeout
        )
        self.leader.claim()
        self.link = MqttLink(link, on_message=self._on_message, on_connect=self._on_connect)
        self.link.subscribe(self.topics.all_updates, qos=1)
        self.link.subscribe(self.topics.bundle, qos=1)
        if cfg.sampling.enabled or self.watch_devices:
            self.link.subscribe(self.topics.all_status, qos=1)  # who is connected (retained statuses first)
        self.publisher = Publisher(self.link, self.topics, self.signing, self.events, max_message_size=cfg.wire.max_message_size)
        self.intake = Intake(
            self.topics,
            self.manifest.num_params,
            self.store,
            self.signing,
            self.strategy,
            self.publisher,
            self.events,
            cfg.round_target,
            self.writer,
        )
        self._queue.max_bytes = max(INBOX_BYTES, 4 * max_update_bytes(self.manifest.num_params))
        self.link.start()
        deadline = time.monotonic() + cfg.connect_timeout
        while not self.link.wait_connected(0.2):
            if self._stop.is_set():
                raise Stopped()
            if time.monotonic() > deadline:
                raise UsageError(
                    f"cannot reach the broker at {cfg.link.url} within {cfg.connect_timeout:.0f}s: {self.link.last_error or 'no answer'}"
                )

    # ------------------------------------------------------------------ MQTT plumbing

    def _fleet_lost(self, reason: str) -> None:  # the lease keeper's thread
        self.exit_reason = reason
        self.stop(EXIT_FLEET_LOST)

    def _on_message(self, topic: str, payload: bytes) -> None:  # network thread
        self._queue.put("message", topic, bytes(payload))  # waits while the backlog is full

    def _on_connect(self) -> None:  # network thread
        self._queue.put_control("connected")

    def _flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 message we published."""
        if self.link is not None and getattr(self, "intake", None) is not None:
            self.intake.pump_acks(everything=True)  # acks held back from paho's queue (intake.ACK_WINDOW)
        if self.link is None or self.link.flush(timeout):
            return True
        self.events.log("flush_timeout", None, level=logging.WARNING, unacknowledged=self.link.unacknowledged())
        return False

    def _handle_next_event(self, timeout: float) -> None:
        for event in self._queue.take(max(timeout, 0.0), 1):
            self._handle(event)

    def _handle(self, event: Event) -> None:
        kind, topic, payload = event.kind, event.topic, event.payload
        if kind == "durable":  # outside the try below: a failed durable write must stop the run
            self._finish_durable()
            return
        try:
            if kind == "connected":
                self._connects += 1
                if self._connects > 1:
                    # A restarted broker may have lost every retained message: put ours back.
                    n = self.link.republish_retained()
                    self.events.log("republish_retained", self.current.round if self.current else None, messages=n)
            elif kind == "message":
                if topic == self.topics.bundle:
                    self.publisher.on_bundle_announcement(self.plan, payload)
                elif self.presence.is_status(topic):
                    self._on_status(topic, payload)
                elif topic.startswith(self.topics.base + "/update/"):
                    if self.current is not None:
                        self.intake.on_update(self.current, topic, payload)
                # else: a topic we never subscribed to (amqtt 0.12.1 delivers other clients' retained messages)
        except (RoundFailed, Stopped):
            raise
        except ProtocolError as exc:  # a malformed status message: one line, nothing changes
            self.events.log(
                "message_ignored",
                self.current.round if self.current else None,
                level=logging.WARNING,
                topic=topic,
                reason=exc.reason,
            )
        except Exception as exc:  # a bug must cost one message, not the run
            log.exception(
                "%s",
                kv(
                    event="handler_failed",
                    round=self.current.round if self.current else "-",
                    topic=topic,
                    error=f"{type(exc).__name__}: {exc}",
                ),
            )

    def _on_status(self, topic: str, payload: bytes) -> None:
        """A device's retained status: who may be invited (client sampling), and, when the engine
        watches devices (metrics), told to the listeners (logged at debug: it is no round event)."""
        status = self.presence.on_status(topic, payload)  # None: cleared on purpose; ProtocolError: message_ignored
        if self.watch_devices:
            state = status.state if status is not None else "removed"
            health = status.health.to_json() if status is not None and status.health is not None else {}
            self.events.emit(
                "device_status",
                status.round if status else None,
                device=self.topics.device_of(topic, "status"),
                level=logging.DEBUG,
                state=state,
                **health,
            )

    def _drain_events(self, limit: int = DRAIN_BATCH) -> None:
        """Handle what is already queued (no waiting), in batches, so updates that arrived
        together are made durable together. Never past the round's target: each event adds at
        most one accepted update, so a batch is at most what the target still needs."""
        run = self.current
        assert run is not None  # only called while a round is open
        while limit > 0 and len(run.accepted) < run.target:
            batch = self._queue.take(0.0, min(limit, run.target - len(run.accepted)))
            if not batch:
                return
            limit -= len(batch)
            for event in batch:
                self._handle(event)

    # ------------------------------------------------------------------ rounds

    def _round_state(self, state: str, reason: str = "", rnd: int | None = None) -> None:
        pol = self.config.rounds
        run = self.current
        r = rnd if rnd is not None else (run.round if run else self.store.open_round)
        self.publisher.round_state(
            RoundState(
                run_id=self.store.run_id,
                round=r,
                state=state,
                total_rounds=pol.rounds,
                deadline=run.deadline if run and state == "open" else 0.0,
                min_devices=pol.min_devices,
                target_devices=run.target if run else self.config.round_target,
                accepted=len(run.accepted) if run and rnd is None else 0,
                reason=reason,
            )
        )

    def _run_round(self, rnd: int) -> None:
        cfg = self.config
        pol = cfg.rounds
        store = self.store
        w = store.weights
        self.strategy.begin_round(rnd, w)
        now = time.time()
        run = RoundRun(
            round=rnd,
            opened_at=now,
            deadline=now + pol.deadline,
            config=cfg.wire.apply(cfg.training.round_config(rnd, pol.rounds, self.bundle_lr)),
            target=cfg.round_target,
        )
        partial = store.load_partial(rnd) if rnd == self._first_round else None  # only a restart finds one
        if partial is not None:
            self.strategy.load_partial_state(partial.strategy)
            run.accepted = dict(partial.accepted)
            run.opened_at = partial.opened_at or now
            run.bytes_in, run.bytes_out, run.rejected, run.extensions = (
                partial.bytes_in,
                partial.bytes_out,
                partial.rejected,
                partial.extensions,
            )
            run.norms = NormStats.from_doc(partial.norms)
            run.cohort = Cohort.from_doc(partial.cohort) if partial.cohort else None
            self.events.log("round_resumed", rnd, accepted=len(run.accepted), devices=sorted(run.accepted))
        if cfg.sampling.enabled:
            self._settle_closing()  # drawing a cohort may wait for devices: the last round's close goes first
            if run.cohort is None:
                run.cohort = self._draw_cohort(run)
                run.deadline = time.time() + pol.deadline  # the deadline counts from the invitations
            run.target = run.cohort.target
            self.strategy.set_sampling_rate(run.cohort.sampling_rate)
            self.events.log(
                "round_cohort",
                rnd,
                invited=len(run.cohort.invited),
                connected=run.cohort.connected,
                target=run.target,
                sampling_rate=round(run.cohort.sampling_rate, 6),
            )
        self.intake.target = run.target
        self.current = run
        g = GlobalModel(
            store.run_id,
            rnd,
            self.manifest.model_hash,
            w,
            train=True,
            total_rounds=pol.rounds,
            deadline=run.deadline,
            config=run.config,
            invite=run.cohort.invitation if run.cohort is not None else None,
        )
        run.global_bytes = self.publisher.global_model(g)
        run.bytes_out += run.global_bytes
        # The devices have round r+1's model: now round r's close (closed state, evaluation, the
        # durable commit on the writer thread) happens while they train.
        self._settle_closing()
        self._round_state("open")
        self.events.emit(
            "round_open",
            rnd,
            deadline_s=pol.deadline,
            min_devices=pol.min_devices,
            target_devices=run.target,
            config=run.config.to_meta() or "-",
            deadline=run.deadline,
            accepted=len(run.accepted),
        )
        while True:
            if len(run.accepted) >= run.target:
                self._close_round(run, "target")
                return
            now = time.time()
            if now >= run.deadline:
                if len(run.accepted) >= pol.min_devices:
                    self._close_round(run, "deadline")
                    return
                self._deadline_missed(run)
                continue
            self._handle_next_event(min(run.deadline - now, 0.5))
            self._drain_events()
            if len(run.accepted) < run.target:
                self.intake.commit_acks(run)  # else: the round's commit at close makes them durable
            if self._stop.is_set():
                raise Stopped()

    def _stopped(self) -> int:
        run = self.current
        reason = "fleet_lost" if self._stop_code == EXIT_FLEET_LOST else "signal"
        self.events.log("aggregator_stopped", run.round if run else None, reason=reason, accepted=len(run.accepted) if run else 0)
        return self._stop_code


def run_aggregator(config: AggregatorConfig, on_event: EventCallback | None = None) -> int:
    """Run to the end; 0 when every round closed, 3 when a round failed. UsageError for bad input."""
    return Aggregator(config, on_event).run()

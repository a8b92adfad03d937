"""The round engine: opens rounds, validates and folds in updates, closes, evaluates, persists.

    config = AggregatorConfig(broker="mqtt://127.0.0.1:1883", state_dir=Path("runs/a"),
                              rounds=5, min_devices=2, bundle=Path("bundles/boston"))
    code = Aggregator(config).run()     # 0 done, 3 a round failed, 130/143 stopped
    # or run_aggregator(config)

Shape (as in the device agent): MQTT callbacks only put events on a queue; the thread that
called run() owns all state and handles one event at a time. Nothing a message holds can
stop the loop: a bad update costs one log line and one negative ack.

Round state machine (docs/aggregator.md has the picture):

    open(r) --target reached----------------------------> closed(r) -> open(r+1) ... finished
    open(r) --deadline, >= min accepted-----------------> closed(r)
    open(r) --deadline, < min, extensions left----------> open(r) (deadline + D, logged)
    open(r) --deadline, < min, no extensions left-------> failed(r)  (exit 3)
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import DEFAULT_CHUNK_SIZE, Ack, BundleAnnouncement, GlobalModel, RoundConfig, RoundMetrics, RoundState, Topics, Update

from fleetlearn.aggregator.logs import kv
from fleetlearn.aggregator.validation import UNKNOWN_NONCE, Rejection, validate_update

log = logging.getLogger("fleetlearn.aggregator")

EXIT_OK = 0
EXIT_ROUND_FAILED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


@dataclass
class AggregatorConfig:
    """Everything `fleetlearn aggregator` takes; the demo builds one directly."""

    broker: str
    state_dir: Path
    rounds: int
    min_devices: int
    bundle: Path | None = None  # an exported bundle dir, or:
    model: str | None = None  # a model to export on start into state_dir/bundle
    input_shape: tuple[int, ...] | None = None  # export options for `model`
    loss: str | None = None
    optimizer: str | None = None
    fleet: str = "default"
    target_devices: int | None = None  # default: min_devices
    deadline: float = 60.0  # seconds a round stays open (and each extension adds)
    max_extensions: int = 3
    test_data: Path | None = None
    local_epochs: int | None = None  # round config sent to devices (None: device's own)
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"  # or "cosine": decay from lr toward lr * lr_min_factor over the rounds
    lr_min_factor: float = 0.1
    lr_warmup: int = 0  # rounds of linear warm-up before the schedule
    round_interval: float = 0.0  # open rounds no more often than this (seconds), to watch a demo
    max_steps: int | None = None
    strategy: str = "fedavg"
    clip_norm: float | None = None  # robust / DP options, resolved by aggregator/strategy_options.py
    trim_fraction: float = 0.1
    dp_noise_multiplier: float | None = None
    dp_delta: float = 1e-5
    dp_population: int | None = None  # default: target devices (sampling rate q = 1)
    client_id: str | None = None  # default fleetlearn-aggregator-<fleet>
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    mqtt_protocol: str = "3.1.1"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    connect_timeout: float = 30.0  # give up (exit 2) when the broker is unreachable at start
    # Update signing (aggregator/signing.py, docs/security-signing.md)
    signing_key: Path | None = None  # the aggregator's Ed25519 key; default STATE_DIR/aggregator-signing.key
    device_keys: Path | None = None  # import DIR/<device_id>.pub into STATE_DIR/device-keys on start
    require_signatures: bool | None = None  # None: required when device keys are registered

    @property
    def target(self) -> int:
        return self.target_devices if self.target_devices is not None else self.min_devices

    def validate(self) -> None:
        """Raise UsageError (one line) for anything a user got wrong."""
        from fleetlearn.aggregator.distribution import check_chunk_size

        if (self.bundle is None) == (self.model is None):
            raise UsageError("give exactly one of --bundle DIR or --model NAME")
        if self.bundle is not None and (self.input_shape or self.loss or self.optimizer):
            raise UsageError("--input-shape, --loss and --optimizer are export options: use them with --model, not --bundle")
        if self.rounds < 1:
            raise UsageError(f"--rounds must be >= 1, got {self.rounds}")
        if self.min_devices < 1:
            raise UsageError(f"--min-devices must be >= 1, got {self.min_devices}")
        if self.target < self.min_devices:
            raise UsageError(f"--target-devices {self.target} is below --min-devices {self.min_devices}")
        if not self.deadline > 0:
            raise UsageError(f"--deadline must be > 0 seconds, got {self.deadline}")
        if self.max_extensions < 0:
            raise UsageError(f"--max-extensions must be >= 0, got {self.max_extensions}")
        for name in ("local_epochs", "batch_size", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.lr is not None and not 0 < self.lr <= 10:
            raise UsageError(f"--lr must be in (0, 10], got {self.lr}")
        from fleetlearn.aggregator.schedule import SCHEDULES

        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 < self.lr_min_factor <= 1:
            raise UsageError(f"--lr-min-factor must be in (0, 1], got {self.lr_min_factor}")
        if not 0 <= self.round_interval <= 3600:
            raise UsageError(f"--round-interval must be in [0, 3600] seconds, got {self.round_interval}")
        if not 0 <= self.lr_warmup < self.rounds:
            raise UsageError(f"--lr-warmup must be in [0, --rounds), got {self.lr_warmup}")
        check_chunk_size(self.chunk_size)
        from fleetlearn.aggregator.strategy_options import check_strategy_options

        check_strategy_options(self)
        try:
            Topics(self.fleet)
        except Exception as exc:
            raise UsageError(f"--fleet: {exc}") from None
        if self.password_file is not None and self.password is None:
            try:
                self.password = Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise UsageError(f"--password-file {self.password_file}: {exc.strerror or exc}") from None
        if self.password is not None and self.username is None:
            raise UsageError("a password needs --username")
        from fleetlearn.edge_runtime.core.mqtt import BrokerURL

        BrokerURL.parse(self.broker)  # ConfigError (a UsageError) with the reason


@dataclass(frozen=True)
class DueAck:
    """An accepted update whose ack (and `update_accepted` log line) waits for a durable write."""

    update: Update
    accepted: int  # accepted updates in the round once this one counted
    payload_bytes: int


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


class RoundFailed(Exception):
    pass


class Aggregator:
    """One aggregator run. `run()` blocks; `stop()` (any thread) ends it at the next event.

    `on_event(name, fields)`, when given, is called from run()'s thread for: round_open,
    update_accepted, update_rejected, round_extended, round_closed, round_failed, finished.
    """

    def __init__(self, config: AggregatorConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.config = config
        self.on_event = on_event
        self.topics = Topics(config.fleet) if _safe_fleet(config.fleet) else None
        self.exit_reason = ""
        self._events: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._stop_code = EXIT_SIGTERM
        self._connects = 0
        self._pending_pubs: list[Any] = []
        # Accepted updates whose ack waits for the next durable write (group commit): one
        # fsync covers every update that arrived together, instead of one fsync each.
        self._acks_due: list[DueAck] = []
        self._cleared_hashes: set[str] = set()
        self._last_retained: dict[str, bytes] = {}  # topic -> payload, republished on reconnect
        self.link = None
        self.store = None
        self.current: RoundRun | None = None

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
            self._publish_bundle()
            for rnd in range(self.store.open_round, cfg.rounds + 1):
                opened = time.monotonic()
                self._run_round(rnd)
                # --round-interval paces the run (demos watched by a person); 0 by default.
                if self._stop.wait(max(0.0, cfg.round_interval - (time.monotonic() - opened))) or self._stop.is_set():
                    return self._stopped()
            self._finish()
            return EXIT_OK
        except RoundFailed as exc:
            self.exit_reason = str(exc)
            return EXIT_ROUND_FAILED
        except _Stopped:
            return self._stopped()
        finally:
            self._flush(5.0)
            if self.link is not None:
                self.link.stop()

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        from fleetlearn.edge_runtime.core.bundle import load_bundle
        from fleetlearn.edge_runtime.core.data import load_dataset
        from fleetlearn.edge_runtime.engines.trainer import Trainer

        from fleetlearn.aggregator.distribution import plan_bundle
        from fleetlearn.aggregator.model_store import ModelStore
        from fleetlearn.aggregator.strategy import make_strategy

        cfg = self.config
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.bundle_dir = Path(cfg.bundle) if cfg.bundle is not None else self._export_bundle()
        self.manifest = load_bundle(self.bundle_dir)
        self.plan = plan_bundle(self.bundle_dir, self.manifest, cfg.chunk_size)
        self.test_data = load_dataset(cfg.test_data, self.manifest) if cfg.test_data is not None else None
        self.trainer = Trainer(self.bundle_dir, self.manifest)
        self.store = ModelStore.open(self.state_dir, self.manifest.model_hash, self.manifest.num_params, self.trainer.get_weights)
        from fleetlearn.aggregator.signing import open_signing

        self.signing = open_signing(
            self.state_dir, self.store.run_id, self.store.open_round,
            signing_key=cfg.signing_key, device_keys=cfg.device_keys, require=cfg.require_signatures,
        )
        # A schedule needs a base rate: the one given, else the bundle's own.
        scheduled = cfg.lr_schedule != "constant" or cfg.lr_warmup > 0
        lr = cfg.lr if cfg.lr is not None or not scheduled else float(self.manifest.optimizer.get("lr", 1e-3))
        from fleetlearn.aggregator.strategy_options import strategy_options

        strategy_name, strategy_extra = strategy_options(cfg)  # ("fedavg", {}) by default
        self.strategy = make_strategy(
            strategy_name, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=lr, max_steps=cfg.max_steps,
            lr_schedule=cfg.lr_schedule, lr_min_factor=cfg.lr_min_factor, total_rounds=cfg.rounds,
            lr_warmup=cfg.lr_warmup, **strategy_extra,
        )
        self._log(
            logging.INFO,
            "aggregator_start",
            None,
            run_id=self.store.run_id,
            resumed_after=self.store.round,
            rounds=cfg.rounds,
            model=self.manifest.model_name,
            model_hash=self.manifest.model_hash[:12],
            params=self.manifest.num_params,
            fleet=cfg.fleet,
            broker=cfg.broker,
            min_devices=cfg.min_devices,
            target_devices=cfg.target,
            strategy=cfg.strategy,
        )

    def _export_bundle(self) -> Path:
        """--model: export into state_dir/bundle once; a restart reuses the bundle it wrote."""
        from fleetlearn.edge_runtime.core.bundle import load_manifest
        from fleetlearn.edge_runtime.core.errors import BundleError

        cfg = self.config
        out = self.state_dir / "bundle"
        try:
            load_manifest(out)
            self._log(logging.INFO, "bundle_reused", None, path=str(out))
            return out
        except BundleError:
            pass
        try:
            from fleetlearn.export import build_bundle, resolve_model
        except ImportError as exc:
            raise UsageError(f"--model needs the export extra (torch, onnx): {exc}") from None
        model, defaults = resolve_model(cfg.model, seed=0)  # reproducible initial weights
        input_shape = cfg.input_shape or getattr(defaults, "input_shape", None)
        if input_shape is None:
            raise UsageError(f"model {cfg.model!r} has no default input shape; give --input-shape")
        loss = cfg.loss or getattr(defaults, "loss", None)
        if loss is None:
            raise UsageError(f"model {cfg.model!r} has no default loss; give --loss (mse, cross_entropy or bce_with_logits)")
        kwargs: dict[str, Any] = {"model_name": getattr(defaults, "name", None) or cfg.model, "input_shape": tuple(input_shape), "loss": loss}
        if cfg.optimizer:
            kwargs["optimizer"] = cfg.optimizer
        self._log(logging.INFO, "bundle_export", None, model=cfg.model, path=str(out))
        build_bundle(model, out, **kwargs)
        return out

    def _connect(self) -> None:
        from fleetlearn.edge_runtime.core.mqtt import LinkOptions, MqttLink

        cfg = self.config
        opts = LinkOptions(
            url=cfg.broker,
            client_id=cfg.client_id or f"fleetlearn-aggregator-{cfg.fleet}",
            username=cfg.username,
            password=cfg.password,
            ca_file=str(cfg.ca_file) if cfg.ca_file else None,
            cert_file=str(cfg.cert_file) if cfg.cert_file else None,
            key_file=str(cfg.key_file) if cfg.key_file else None,
            protocol=cfg.mqtt_protocol,
            clean_session=False,  # the broker queues updates while we restart (mosquitto does)
        )
        self.link = MqttLink(opts, on_message=self._on_message, on_connect=self._on_connect)
        self.link.subscribe(self.topics.all_updates, qos=1)
        self.link.subscribe(self.topics.bundle, qos=1)
        self.link.start()
        deadline = time.monotonic() + cfg.connect_timeout
        while not self.link.wait_connected(0.2):
            if self._stop.is_set():
                raise _Stopped()
            if time.monotonic() > deadline:
                raise UsageError(f"cannot reach the broker at {cfg.broker} within {cfg.connect_timeout:.0f}s: {self.link.last_error or 'no answer'}")

    # ------------------------------------------------------------------ MQTT plumbing

    def _on_message(self, topic: str, payload: bytes) -> None:  # network thread
        self._events.put(("message", topic, bytes(payload)))

    def _on_connect(self) -> None:  # network thread
        self._events.put(("connected", "", b""))

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """QoS 1 publish; returns the bytes sent. Retained messages are remembered and
        republished after a reconnect (a restarted broker may have lost them)."""
        info = self.link.client.publish(topic, payload, qos=1, retain=retain)
        self._pending_pubs.append(info)
        if len(self._pending_pubs) > 512:
            self._pending_pubs = [i for i in self._pending_pubs if not _published(i)]
        if retain:
            if payload:
                self._last_retained[topic] = payload
            else:
                self._last_retained.pop(topic, None)
        return len(payload)

    def _flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 message we published."""
        if self.link is None:
            return True
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._pending_pubs = [i for i in self._pending_pubs if not _published(i)]
            if not self._pending_pubs:
                return True
            time.sleep(0.01)
        self._log(logging.WARNING, "flush_timeout", None, unacknowledged=len(self._pending_pubs))
        return False

    def _republish_retained(self) -> None:
        self._log(logging.INFO, "republish_retained", self.current.round if self.current else None, messages=len(self._last_retained))
        for topic, payload in list(self._last_retained.items()):
            self.link.client.publish(topic, payload, qos=1, retain=True)

    # ------------------------------------------------------------------ logging / events

    def _log(self, level: int, event: str, rnd: int | None, device: str | None = None, **fields: Any) -> None:
        """One line: `event=... [device=...] round=... key=value...` (round `-` outside rounds)."""
        log.log(level, "%s", kv(event=event, device=device, round=rnd if rnd is not None else "-", **fields))

    def _emit(self, name: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, fields)
        except Exception:
            log.exception("%s", kv(event="on_event_failed", name=name))

    # ------------------------------------------------------------------ bundle

    def _publish_bundle(self) -> None:
        from fleetlearn.aggregator.distribution import chunk_messages

        a = self.plan.announcement
        t0 = time.monotonic()
        for topic, payload in chunk_messages(self.plan, self.topics):
            self._publish(topic, payload, retain=True)
        # The announcement goes last: a device that sees it finds every chunk already there.
        self._publish(self.topics.bundle, self.signing.sign_announcement(a.encode()), retain=True)
        self._log(logging.INFO, "bundle_published", None, model_hash=a.model_hash[:12], bytes=a.total_bytes, chunks=a.chunks, chunk_size=a.chunk_size, s=time.monotonic() - t0)

    def _on_bundle_announcement(self, payload: bytes) -> None:
        from fleetlearn.aggregator.distribution import clear_messages

        if not payload:
            return
        try:
            old = BundleAnnouncement.decode(payload)
        except Exception as exc:
            self._log(logging.WARNING, "bundle_announcement_ignored", None, reason=str(exc)[:200])
            return
        if old.model_hash == self.plan.model_hash or old.model_hash in self._cleared_hashes:
            return
        # Another model's announcement was retained (an older run on this fleet): ours
        # replaces it; clear its chunks so the broker does not keep them forever.
        self._cleared_hashes.add(old.model_hash)
        for topic, empty in clear_messages(old, self.topics):
            self._publish(topic, empty, retain=True)
        self._publish(self.topics.bundle, self.signing.sign_announcement(self.plan.announcement.encode()), retain=True)
        self._log(logging.INFO, "old_bundle_cleared", None, model_hash=old.model_hash[:12], chunks=old.chunks)

    # ------------------------------------------------------------------ rounds

    def _run_round(self, rnd: int) -> None:
        cfg = self.config
        store = self.store
        w = store.weights
        self.strategy.begin_round(w)
        now = time.time()
        run = RoundRun(round=rnd, opened_at=now, deadline=now + cfg.deadline, config=self.strategy.configure_round(rnd, w))
        partial = store.load_partial(rnd)
        if partial is not None:
            self.strategy.load_state_dict(partial.strategy)
            run.accepted = dict(partial.accepted)
            run.opened_at = partial.opened_at or now
            run.bytes_in, run.bytes_out, run.rejected, run.extensions = partial.bytes_in, partial.bytes_out, partial.rejected, partial.extensions
            self._log(logging.INFO, "round_resumed", rnd, accepted=len(run.accepted), devices=sorted(run.accepted))
        self.current = run
        g = GlobalModel(store.run_id, rnd, self.manifest.model_hash, w, train=True, total_rounds=cfg.rounds, deadline=run.deadline, config=run.config)
        run.bytes_out += self._publish(self.topics.global_model, g.encode(sign=self.signing.sign), retain=True)
        self._publish_round_state("open")
        self._log(logging.INFO, "round_open", rnd, deadline_s=cfg.deadline, min_devices=cfg.min_devices, target_devices=cfg.target, config=run.config.to_meta() or "-")
        self._emit("round_open", round=rnd, deadline=run.deadline, accepted=len(run.accepted))
        while True:
            if len(run.accepted) >= cfg.target:
                self._close_round(run, "target")
                return
            now = time.time()
            if now >= run.deadline:
                if len(run.accepted) >= cfg.min_devices:
                    self._close_round(run, "deadline")
                    return
                self._deadline_missed(run)
                continue
            self._handle_next_event(min(run.deadline - now, 0.5))
            self._drain_events()
            if len(run.accepted) < cfg.target:
                self._commit_acks(run)  # else: the round's commit at close makes them durable
            if self._stop.is_set():
                raise _Stopped()

    def _deadline_missed(self, run: RoundRun) -> None:
        cfg = self.config
        k = len(run.accepted)
        if run.extensions >= cfg.max_extensions:
            reason = (
                f"round {run.round} failed: {k} of the {cfg.min_devices} devices needed sent an accepted update "
                f"within {cfg.deadline:g}s and {cfg.max_extensions} extension(s)"
            )
            self._publish_round_state("failed", reason=reason)
            self._log(logging.ERROR, "round_failed", run.round, accepted=k, min_devices=cfg.min_devices, extensions=run.extensions, reason=reason)
            self._emit("round_failed", round=run.round, reason=reason)
            raise RoundFailed(reason)
        run.extensions += 1
        run.deadline = time.time() + cfg.deadline
        self._save_partial(run)
        self._send_due_acks(run)
        self._publish_round_state("open")
        self._log(
            logging.WARNING,
            "round_extended",
            run.round,
            accepted=k,
            min_devices=cfg.min_devices,
            extension=run.extensions,
            max_extensions=cfg.max_extensions,
            reason=f"only {k} of {cfg.min_devices} required devices answered by the deadline",
        )
        self._emit("round_extended", round=run.round, accepted=k, extension=run.extensions, deadline=run.deadline)

    def _publish_round_state(self, state: str, reason: str = "", rnd: int | None = None) -> None:
        cfg = self.config
        run = self.current
        r = rnd if rnd is not None else (run.round if run else self.store.open_round)
        rs = RoundState(
            run_id=self.store.run_id,
            round=r,
            state=state,
            total_rounds=cfg.rounds,
            deadline=run.deadline if run and state == "open" else 0.0,
            min_devices=cfg.min_devices,
            target_devices=cfg.target,
            accepted=len(run.accepted) if run and rnd is None else 0,
            reason=reason,
        )
        self._publish(self.topics.round, rs.encode(), retain=True)

    def _drain_events(self, limit: int = 256) -> None:
        """Handle what is already queued (no waiting), so updates that arrived together are
        made durable together."""
        for _ in range(limit):
            if self._events.empty() or len(self.current.accepted) >= self.config.target:
                return
            self._handle_next_event(0.0)

    def _commit_acks(self, run: RoundRun) -> None:
        """Persist the round's running sum once, then ack every update it now holds."""
        if not self._acks_due:
            return
        self._save_partial(run)
        self._send_due_acks(run)

    def _send_due_acks(self, run: RoundRun) -> None:
        self._publish_acks(self._encode_due_acks(run))

    def _encode_due_acks(self, run: RoundRun) -> list[tuple[DueAck, bytes]]:
        """The due acks with their payloads, counted in the round's bytes out."""
        due, self._acks_due = self._acks_due, []
        out = [(d, Ack(self.store.run_id, d.update.round, d.update.device_id, d.update.nonce, True).encode()) for d in due]
        run.bytes_out += sum(len(p) for _, p in out)
        return out

    def _publish_acks(self, acks: list[tuple[DueAck, bytes]]) -> None:
        """Ack durable updates; `update_accepted` is logged here, so the log never claims an
        update that a crash could still lose."""
        for due, payload in acks:
            u = due.update
            self._publish(self.topics.ack(u.device_id), payload)
            self._log(logging.INFO, "update_accepted", u.round, device=u.device_id, samples=u.samples, train_loss=u.train_loss, train_s=u.train_s, accepted=due.accepted, target=self.config.target, bytes=due.payload_bytes)
            self._emit("update_accepted", round=u.round, device=u.device_id, samples=u.samples, train_loss=u.train_loss, accepted=due.accepted)

    def _handle_next_event(self, timeout: float) -> None:
        try:
            kind, topic, payload = self._events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return
        try:
            if kind == "connected":
                self._connects += 1
                if self._connects > 1:
                    self._republish_retained()
            elif kind == "message":
                if topic == self.topics.bundle:
                    self._on_bundle_announcement(payload)
                else:
                    self._on_update(topic, payload)
        except (RoundFailed, _Stopped):
            raise
        except Exception as exc:  # a bug must cost one message, not the run
            log.exception("%s", kv(event="handler_failed", round=self.current.round if self.current else "-", topic=topic, error=f"{type(exc).__name__}: {exc}"))

    def _on_update(self, topic: str, payload: bytes) -> None:
        from fleetlearn.edge_runtime.core.errors import ProtocolError

        run = self.current
        assert run is not None
        run.bytes_in += len(payload)
        try:
            verdict = validate_update(
                topic,
                payload,
                topics=self.topics,
                num_params=self.manifest.num_params,
                version=self.store,
                accepted=run.accepted,
                previous_accepted=self.store.last_accepted,
                authenticate=self.signing.authenticate,
            )
        except Rejection as rej:
            self._reject(run, rej)
            return
        u = verdict.update
        if verdict.duplicate:
            self._log(logging.INFO, "update_duplicate", u.round, device=u.device_id, nonce=u.nonce[:8], note=verdict.note)
            if any(d.update.device_id == u.device_id and d.update.nonce == u.nonce for d in self._acks_due):
                return  # counted but not yet durable: its ack is already due with the next write
            run.bytes_out += self._ack(u.device_id, u.round, u.nonce, True, verdict.note)
            return
        try:
            self.strategy.accumulate(u)
        except ProtocolError as exc:  # the strategy refused it (e.g. a robust bound)
            self._reject(run, Rejection(exc.reason, u.device_id, u.round, u.nonce))
            return
        run.accepted[u.device_id] = u.nonce
        # Durable before the ack: an aggregator killed after acking loses nothing. The ack is
        # due with the next durable write (_commit_acks, or the round's commit at close).
        self._acks_due.append(DueAck(u, len(run.accepted), len(payload)))

    def _reject(self, run: RoundRun, rej: Rejection) -> None:
        run.rejected += 1
        rnd = rej.round if rej.round is not None else run.round
        self._log(logging.WARNING, "update_rejected", rnd, device=rej.device or "?", reason=rej.reason)
        self._emit("update_rejected", round=rnd, device=rej.device, reason=rej.reason)
        if rej.device is not None:
            run.bytes_out += self._ack(rej.device, rnd, rej.nonce or UNKNOWN_NONCE, False, rej.reason)

    def _ack(self, device: str, rnd: int, nonce: str, accepted: bool, reason: str = "") -> int:
        ack = Ack(self.store.run_id, rnd, device, nonce, accepted, reason)
        return self._publish(self.topics.ack(device), ack.encode())

    def _save_partial(self, run: RoundRun) -> None:
        from fleetlearn.aggregator.model_store import PartialRound

        self.store.save_partial(
            PartialRound(
                run_id=self.store.run_id,
                round=run.round,
                accepted=dict(run.accepted),
                strategy=self.strategy.state_dict(),
                opened_at=run.opened_at,
                bytes_in=run.bytes_in,
                bytes_out=run.bytes_out,
                rejected=run.rejected,
                extensions=run.extensions,
            )
        )

    def _close_round(self, run: RoundRun, closed_by: str) -> None:
        k = len(run.accepted)
        self._publish_round_state("closed")
        new_w = self.strategy.aggregate()
        if not np.isfinite(new_w).all():
            # Finite deltas can still overflow float32 when summed; never publish such a model.
            reason = f"round {run.round} failed: the aggregated model holds NaN/Inf values"
            self._publish_round_state("failed", reason=reason)
            self._log(logging.ERROR, "round_failed", run.round, reason=reason)
            raise RoundFailed(reason)
        summary = self.strategy.round_summary()
        record: dict[str, Any] = {
            "round": run.round,
            "run_id": self.store.run_id,
            "devices": sorted(run.accepted),
            "accepted": k,
            **summary,
        }
        acks = self._encode_due_acks(run)  # sent once the commit below has made them durable
        if self.test_data is not None:
            t0 = time.perf_counter()
            self.trainer.set_weights(new_w)
            result = self.trainer.evaluate(self.test_data)
            name, value = result.metric()
            record[name] = value
            record["test_loss"] = result.loss
            record["eval_s"] = round(time.perf_counter() - t0, 4)
        closed_at = time.time()
        record.update(
            {
                "wall_s": round(closed_at - run.opened_at, 4),
                "bytes_in": run.bytes_in,
                "bytes_out": run.bytes_out,
                "deadline_extensions": run.extensions,
                "rejected": run.rejected,
                "closed_by": closed_by,
                "strategy": self.strategy.name,
                "opened_at": run.opened_at,
                "closed_at": closed_at,
            }
        )
        record = _finite(record)
        self.store.commit(run.round, new_w, record, run.accepted)
        self._publish_acks(acks)  # the commit made every accepted update of the round durable
        self._publish(self.topics.metrics, RoundMetrics.from_doc(record).encode(), retain=True)
        metric = {k_: record[k_] for k_ in ("test_mse", "test_accuracy") if k_ in record}
        self._log(logging.INFO, "round_closed", run.round, closed_by=closed_by, accepted=k, devices=record["devices"], samples=record.get("samples"), train_loss=record.get("train_loss"), wall_s=record["wall_s"], **metric)
        self._emit("round_closed", **record)
        self.current = None

    def _finish(self) -> None:
        cfg = self.config
        store = self.store
        final = store.weights
        g = GlobalModel(store.run_id, store.round + 1, self.manifest.model_hash, final, train=False, total_rounds=cfg.rounds, deadline=0.0)
        self._publish(self.topics.global_model, g.encode(sign=self.signing.sign), retain=True)
        self._publish_round_state("finished", rnd=store.round + 1)
        out = self.state_dir / "model.onnx"
        tmp = self.state_dir / ".model.tmp.onnx"
        self.trainer.set_weights(final)
        self.trainer.export_inference_model(tmp)
        os.replace(tmp, out)
        self._flush(10.0)
        self._log(logging.INFO, "finished", store.round, rounds=store.round, model=str(out), run_id=store.run_id)
        self._emit("finished", rounds=store.round, model=str(out), run_id=store.run_id)

    def _stopped(self) -> int:
        self._log(logging.INFO, "aggregator_stopped", self.current.round if self.current else None, reason="signal", accepted=len(self.current.accepted) if self.current else 0)
        return self._stop_code


class _Stopped(Exception):
    pass


def _published(info: Any) -> bool:
    """paho's MQTTMessageInfo.is_published(), which raises for a message queued while
    offline (rc NO_CONN) although paho still sends it after the reconnect; then we read the
    flag paho sets on PUBACK."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return bool(getattr(info, "_published", True))


def _safe_fleet(fleet: str) -> bool:
    try:
        Topics(fleet)
        return True
    except Exception:
        return False


def _finite(doc: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: a non-finite float becomes null."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in doc.items()}


def run_aggregator(config: AggregatorConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> int:
    """Run to the end; 0 when every round closed, 3 when a round failed. UsageError for bad input."""
    return Aggregator(config, on_event).run()

"""The device agent: join a fleet, train on each new global model, deliver the delta for sure.

Shape (after paho's examples): MQTT callbacks only put events on a queue; one loop in the
main thread owns all state and handles one event at a time. Nothing a message contains can
crash that loop: a bad message costs one log line.

Delivery is end-to-end. An update is written to the state dir *before* it is first sent, and
re-sent (same bytes, same nonce) after every reconnect and whenever the aggregator announces
the same round again, until the aggregator acknowledges it or closes the round. A broker's
PUBACK proves nothing: mosquitto acknowledges publishes its ACL drops, and amqtt keeps no
queue for offline sessions.
"""

from __future__ import annotations

import logging
import platform
import os
import queue
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.device.bundle_fetch import BundleAssembly, try_load_bundle
from fleetlearn.edge_runtime.device.eligibility import EligibilityGate
from fleetlearn.edge_runtime.device.health import HealthReader
from fleetlearn.edge_runtime.device.local_round import sit_out_reason, train_round
from fleetlearn.edge_runtime.device.signer import load_signer
from fleetlearn.edge_runtime.device.config import DeviceConfig, link_options
from fleetlearn.edge_runtime.core.data import Dataset, load_dataset
from fleetlearn.edge_runtime.core.errors import BundleError, DataError, ProtocolError, UsageError
from fleetlearn.edge_runtime.core.logs import kv
from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import MAX_MODEL_PARAMS, Ack, BundleAnnouncement, GlobalModel, LeaseView, RoundState, Status, Topics, Update, UpdateHeader
from fleetlearn.edge_runtime.core.state_lock import lock_state_dir
from fleetlearn.edge_runtime.device.state import DeviceState, clear_pending_update, load_pending_update, save_pending_update
from fleetlearn.edge_runtime.engines.base import Engine
from fleetlearn.edge_runtime.engines.select import open_engine

log = logging.getLogger("fleetlearn.device")

HEALTH_REFRESH_S = 60.0  # re-publish the status (fresh health readings) at least this often


@dataclass(frozen=True)
class Event:
    kind: str  # "message" | "connected"
    topic: str = ""
    payload: bytes = b""


class DeviceAgent:
    def __init__(self, cfg: DeviceConfig, max_rounds: int | None = None):
        self.cfg = cfg
        self.max_rounds = max_rounds
        self.topics = Topics(cfg.fleet)
        self.state_dir = Path(cfg.state_dir)
        # One device process per state dir (two would clobber the pending update): held for life.
        self.state_lock = lock_state_dir(self.state_dir, "device")
        self.state = DeviceState.load(self.state_dir)
        self.rounds_done = 0  # rounds this process completed (for --max-rounds)
        self.events: queue.Queue[Event] = queue.Queue()
        self.stopping = threading.Event()
        self.manifest: Manifest | None = None
        self.trainer: Engine | None = None  # the training engine chosen by [training] engine
        self.data: Dataset | None = None
        self._data_mtime: float | None = None
        self.assembly: BundleAssembly | None = None
        self.waiting_global: GlobalModel | None = None  # a global model for a bundle we are fetching
        self.signer = load_signer(cfg)
        self.status_state = "idle"
        self.status_last: tuple[str, int | None, str] = ("idle", None, "")  # (state, round, detail) last published
        self._status_t = time.monotonic()  # of the last status, for the health heartbeat
        self.health = HealthReader(self.state_dir, cfg.sysfs_root)
        self.gate = EligibilityGate(cfg.eligibility, self.health.read, HEALTH_REFRESH_S)
        self._not_invited: tuple[str, int] = ("", 0)  # the last (run, round) we were not invited to
        self._sat_out: tuple[str, int] = ("", 0)  # the last (run, round) this bundle could not train as asked
        self.link = MqttLink(
            link_options(cfg),
            on_message=self._on_message,
            on_connect=lambda: self.events.put(Event("connected")),
            will_provider=self._last_will,
        )
        self.leader = LeaseView()  # the fleet's leader lease: rounds of any other run are ignored
        for topic in (self.topics.leader, self.topics.global_model, self.topics.round, self.topics.ack(cfg.device_id), self.topics.bundle):
            self.link.subscribe(topic, qos=1)

    # ------------------------------------------------------------------ setup

    def _last_will(self) -> tuple[str, bytes, int, bool]:
        """The `offline` status the broker publishes for us if we vanish (built per connect)."""
        offline = Status(self.cfg.device_id, "offline", self.state.last_round, "connection lost (last will)", time.time())
        return self.topics.status(self.cfg.device_id), offline.encode(), 1, True

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.events.put(Event("message", topic, bytes(payload)))

    def _log(self, level: int, event: str, round_: int | None = None, **fields) -> None:
        log.log(level, "%s", kv(event=event, device=self.cfg.device_id, round="-" if round_ is None else round_, **fields))

    def _status(self, state: str, round_: int | None = None, detail: str = "") -> None:
        if state == "ineligible" and not detail and self.status_last[0] == "ineligible":
            detail = self.status_last[2]  # a reconnect re-announces the state: keep its reason
        self.status_state = state
        self.status_last, self._status_t = (state, round_, detail), time.monotonic()
        r = self.state.last_round if round_ is None else round_
        health = self.health.read()
        self.link.publish(self.topics.status(self.cfg.device_id), Status(self.cfg.device_id, state, r, detail, time.time(), health=health,
                                 engine=self.trainer.name if self.trainer else None, arch=platform.machine() or None).encode(), qos=1, retain=True)

    def _load_bundle(self) -> bool:
        manifest, reason = try_load_bundle(self.cfg.bundle)
        if manifest is None:
            self.manifest, self.trainer = None, None
            self._log(logging.WARNING, "bundle_unavailable", reason=reason)
            return False
        try:
            self.trainer = open_engine(self.cfg.bundle, manifest, self.cfg.training.engine, threads=self.cfg.training.threads)
        except (UsageError, RuntimeError, OSError) as exc:  # ORT raises RuntimeError-like errors for bad graphs
            self.manifest, self.trainer = None, None
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self._log(logging.ERROR, "bundle_unusable", reason=reason, engine=self.cfg.training.engine)
            self._status("error", detail=f"bundle unusable: {reason}")
            return False
        self.manifest = manifest
        self.data = None  # preprocessing may have changed with the model
        self._log(logging.INFO, "bundle_loaded", model=manifest.model_name, model_hash=manifest.model_hash[:12], params=manifest.num_params, engine=self.trainer.name)
        return True

    def _ensure_data(self) -> Dataset:
        """Local data, reloaded when the file changes. Raises DataError with the reason."""
        assert self.manifest is not None
        try:
            mtime = os.stat(self.cfg.data).st_mtime
        except OSError:
            mtime = None
        if self.data is None or mtime != self._data_mtime:
            self.data = None
            self.data = load_dataset(self.cfg.data, self.manifest, self.cfg.target)
            self._data_mtime = mtime
            self._log(logging.INFO, "data_loaded", samples=len(self.data))
        return self.data

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self._install_signal_handlers()
        self._load_bundle()
        self._recover_pending()
        self._log(logging.INFO, "device_start", broker=self.cfg.broker, fleet=self.cfg.fleet, pending=self.state.pending_round)
        self.link.start()
        try:
            while not self.stopping.is_set():
                self._tick()
                try:
                    event = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._dispatch(event)
                if self.max_rounds is not None and self.rounds_done >= self.max_rounds:
                    self._log(logging.INFO, "max_rounds_reached", rounds=self.rounds_done)
                    break
        finally:
            self._status("offline", detail="stopped")
            self.link.stop()
            self._log(logging.INFO, "device_stop", rounds=self.rounds_done)
        return 0

    def _recover_pending(self) -> None:
        """After a power cut device_state.json (not fsynced) may be older than the pending
        update file (fsynced): the frame itself says which run, round and nonce it is."""
        payload = load_pending_update(self.state_dir)
        if payload is None or self.state.pending_round:
            return
        try:
            peek = UpdateHeader.peek(payload, verify_body=True).require("run_id", "round", "nonce")
            run_id, round_, nonce = str(peek.run_id), int(peek.round or 0), str(peek.nonce)
        except ProtocolError:
            clear_pending_update(self.state_dir)
            return
        if round_ > self.state.last_round:
            self.state.run_id, self.state.pending_round, self.state.pending_nonce = run_id, round_, nonce
            self.state.save(self.state_dir)
            self._log(logging.INFO, "pending_update_recovered", round_)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def _dispatch(self, event: Event) -> None:
        """Handle one event; whatever it holds, the loop and the state dir survive it."""
        try:
            if event.kind == "connected":
                self._on_connected()
            elif event.kind == "eligible":
                self._on_eligible()
            elif event.topic == self.topics.leader:
                before = self.leader.current
                lease = self.leader.observe(event.payload)
                if lease is not None and (before is None or (before.token, before.state) != (lease.token, lease.state)):  # not each renewal
                    self._log(logging.INFO, "leader", run_id=lease.run_id[:8], holder=lease.holder, state=lease.state)
            elif event.topic == self.topics.global_model:
                self._on_global(event.payload)
            elif event.topic == self.topics.ack(self.cfg.device_id):
                self._on_ack(event.payload)
            elif event.topic == self.topics.round:
                self._on_round(event.payload)
            elif event.topic == self.topics.bundle:
                self._on_bundle_announcement(event.payload)
            elif self.assembly and event.topic.startswith(self.topics.bundle + "/"):
                self._on_bundle_chunk(event.payload)
        except ProtocolError as exc:
            self._log(logging.WARNING, "message_rejected", topic=event.topic, reason=exc.reason)
        except (DataError, BundleError) as exc:
            self._log(logging.ERROR, "cannot_train", reason=str(exc))
            self._status("error", detail=str(exc))
        except Exception as exc:  # a bug must cost one round, not the device
            log.exception("event=handler_failed device=%s topic=%s", self.cfg.device_id, event.topic)
            self._status("error", detail=f"internal error: {type(exc).__name__}: {str(exc)[:150]}")

    # ------------------------------------------------------------------ handlers

    def _on_connected(self) -> None:
        self._status("idle" if self.status_state in ("idle", "offline", "error") else self.status_state)
        pending = load_pending_update(self.state_dir) if self.state.pending_round else None
        if pending:
            self._log(logging.INFO, "update_resent", self.state.pending_round, reason="reconnected")
            self.link.publish(self.topics.update(self.cfg.device_id), pending, qos=1)

    def _on_global(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        self._handle_global(GlobalModel.decode(payload, max_params=MAX_MODEL_PARAMS))

    def _handle_global(self, g: GlobalModel) -> None:
        if not self.leader.allows(g.run_id):
            raise ProtocolError(f"global model of run {g.run_id[:8]}, not the leader's run {self.leader.current.run_id[:8]}")  # type: ignore[union-attr]
        if self.signer and not self.signer.verify_global(g):
            raise ProtocolError("global model signature does not verify with the aggregator's key")
        # Validate everything before any state changes: a bad message must leave state intact.
        m = self.manifest
        if m is not None and g.model_hash == m.model_hash and g.weights.size != m.num_params:
            raise ProtocolError(f"global model has {g.weights.size} parameters, bundle {m.model_hash[:12]} has {m.num_params}")
        if g.run_id != self.state.run_id:
            self._log(logging.INFO, "new_run", g.round, run_id=g.run_id[:8])
            clear_pending_update(self.state_dir)
            self.state = DeviceState(run_id=g.run_id)
            self.state.save(self.state_dir)
        if not g.train:
            self._status("idle", g.round, "run finished")
            return
        if self.manifest is None or g.model_hash != self.manifest.model_hash:
            self.waiting_global = g
            self._log(logging.INFO, "model_mismatch", g.round, wanted=g.model_hash[:12], have=self.manifest.model_hash[:12] if self.manifest else "none")
            self._status("fetching", g.round, "waiting for the announced bundle")
            return
        if self.state.pending_round and self.state.pending_round < g.round:
            self._finish_round(self.state.pending_round, "a newer round opened before our update was acknowledged")
        if g.round <= self.state.last_round:
            return  # already done (a retained global seen again after reconnect)
        if self.state.pending_round == g.round:
            pending = load_pending_update(self.state_dir)
            if pending:  # the aggregator re-announced this round (it restarted): send again
                self._log(logging.INFO, "update_resent", g.round, reason="round re-announced")
                self.link.publish(self.topics.update(self.cfg.device_id), pending, qos=1)
                return
        if g.invite is not None and not g.invite.invites(self.cfg.device_id):
            # Client sampling: not asked this round, so no training and no upload (logged once per round).
            if self._not_invited != (g.run_id, g.round):
                self._not_invited = (g.run_id, g.round)
                self._log(logging.INFO, "not_invited", g.round)
                if self.status_state != "idle":  # an idle device says nothing: no status traffic per round
                    self._status("idle", g.round, f"not invited to round {g.round}")
            return
        if not self._may_train(g):
            return
        self._train_and_send(g)

    def _train_and_send(self, g: GlobalModel) -> None:
        assert self.trainer is not None and self.manifest is not None
        reason = sit_out_reason(self.manifest, g)
        if reason is not None:  # e.g. FedProx asked of a bundle without the term: say so, sit it out
            if self._sat_out != (g.run_id, g.round):
                self._sat_out = (g.run_id, g.round)
                self._log(logging.WARNING, "sitting_out", g.round, reason=reason)
                self._status("error", g.round, reason)
            return
        data = self._ensure_data()
        self._status("training", g.round)
        result, delta = train_round(self.trainer, data, self.cfg.training, g, self.cfg.device_id)
        if not (np.isfinite(result.mean_loss) and np.isfinite(delta).all()):
            # Diverged (too high a learning rate, bad data scale): nothing useful to send. Say so
            # and sit this round out; the next global model resets the weights.
            self._log(logging.ERROR, "training_diverged", g.round, loss=str(result.mean_loss))
            self._status("error", g.round, f"local training diverged in round {g.round} (loss {result.mean_loss})")
            return
        if self.cfg.privacy.clip_norm is not None:  # [privacy]: clip (+ noise) before it leaves the device
            from fleetlearn.edge_runtime.device.privacy import privatize_delta

            delta = privatize_delta(delta, self.cfg.privacy)
        update = Update(
            run_id=g.run_id,
            round=g.round,
            device_id=self.cfg.device_id,
            model_hash=g.model_hash,
            samples=result.samples,
            train_loss=result.mean_loss,
            train_s=result.seconds,
            nonce=secrets.token_hex(16),
            delta=delta,
        )
        payload = update.encode(sign=self.signer.sign if self.signer else None)
        # Durable before it is sent: a crash after this line re-sends these exact bytes.
        save_pending_update(self.state_dir, payload)
        self.state.pending_round, self.state.pending_nonce = g.round, update.nonce
        self.state.save(self.state_dir)
        self._status("uploading", g.round)
        self.link.publish(self.topics.update(self.cfg.device_id), payload, qos=1)
        self._log(logging.INFO, "update_sent", g.round, samples=result.samples, steps=result.steps, mu=g.config.proximal_mu or 0, loss=f"{result.mean_loss:.4f}", train_s=f"{result.seconds:.4f}", bytes=len(payload))

    def _on_ack(self, payload: bytes) -> None:
        ack = Ack.decode(payload)
        s = self.state
        if ack.run_id != s.run_id or ack.round != s.pending_round or ack.nonce != s.pending_nonce or ack.device_id != self.cfg.device_id:
            return  # an ack for an update we no longer hold (already settled)
        if ack.accepted:
            self._log(logging.INFO, "update_acknowledged", ack.round, note=ack.reason)
        else:
            self._log(logging.WARNING, "update_refused", ack.round, reason=ack.reason)
        self._finish_round(ack.round, "")

    def _on_round(self, payload: bytes) -> None:
        if not payload:
            return
        rs = RoundState.decode(payload)
        if rs.run_id != self.state.run_id or not self.leader.allows(rs.run_id):
            return
        if rs.state in ("closed", "finished", "failed"):
            self.gate.drop_until(rs.round)
        if rs.state in ("closed", "finished", "failed") and self.state.pending_round and self.state.pending_round <= rs.round:
            self._finish_round(self.state.pending_round, f"round {rs.state} before our update was acknowledged")

    def _finish_round(self, round_: int, why: str) -> None:
        if why:
            self._log(logging.WARNING, "update_dropped", round_, reason=why)
        clear_pending_update(self.state_dir)
        self.state.pending_round, self.state.pending_nonce = 0, ""
        self.state.last_round = max(self.state.last_round, round_)
        self.state.save(self.state_dir)
        self.rounds_done += 1
        self._status("idle", round_)

    # ------------------------------------------------------------------ health and eligibility

    def _may_train(self, g: GlobalModel) -> bool:
        """Check [eligibility] before training round g; when it says no, hold g and say why."""
        reason = self.gate.refuse(g)
        if reason is not None:
            self._log(logging.INFO, "ineligible", g.round, reason=reason)
            self._status("ineligible", g.round, reason)
        return reason is None

    def _tick(self) -> None:
        """Between events: look at the eligibility rules again every check_interval_s (an
        ineligible device resumes when they pass), and re-publish the status with fresh health
        readings at least every HEALTH_REFRESH_S."""
        now = time.monotonic()
        if not self.gate.due(now):
            return
        state, round_, detail = self.status_last
        try:
            verdict = self.gate.verdict(state, detail)
            if verdict == "eligible":
                self._log(logging.INFO, "eligible", round_, parked=self.gate.parked.round if self.gate.parked else 0)
                self.events.put(Event("eligible"))
            elif verdict is not None:
                if state == "idle":
                    self._log(logging.INFO, "ineligible", round_, reason=verdict)
                self._status("ineligible", round_, verdict)
            elif now - self._status_t >= HEALTH_REFRESH_S:
                self._status(state, round_, detail)  # heartbeat: same state, fresh health
        except Exception as exc:  # a health file that misbehaves must not stop the device
            self._log(logging.WARNING, "health_check_failed", reason=f"{type(exc).__name__}: {str(exc)[:150]}")

    def _on_eligible(self) -> None:
        if self.status_state != "ineligible":
            return  # the device moved on (a newer round passed the rules) before this event
        g = self.gate.take()
        self._status("idle", g.round if g else None)
        if g is not None:
            self._handle_global(g)  # checks the rules (and everything else) once more

    # ------------------------------------------------------------------ bundle over the air

    def _on_bundle_announcement(self, payload: bytes) -> None:
        if not payload:
            return
        if self.signer and not self.signer.verify_announcement(payload):
            raise ProtocolError("bundle announcement signature does not verify with the aggregator's key")
        a = BundleAnnouncement.decode(payload)
        if self.manifest is not None and a.model_hash == self.manifest.model_hash:
            return
        if self.assembly and self.assembly.model_hash == a.model_hash:
            return
        if self.assembly:
            self.link.unsubscribe(self.topics.bundle_chunks(self.assembly.model_hash))
        self.assembly = BundleAssembly(a)
        self._status("fetching", detail=f"bundle {a.model_hash[:12]}, {a.total_bytes} bytes")
        self._log(logging.INFO, "bundle_fetch", model_hash=a.model_hash[:12], bytes=a.total_bytes, chunks=a.chunks)
        self.link.subscribe(self.topics.bundle_chunks(a.model_hash), qos=1)

    def _on_bundle_chunk(self, payload: bytes) -> None:
        assembly = self.assembly
        assert assembly is not None
        if not payload:
            return
        assembly.add(payload)
        if not assembly.complete:
            return
        self.link.unsubscribe(self.topics.bundle_chunks(assembly.model_hash))
        self.assembly = None
        try:
            assembly.install(self.cfg.bundle)
        except BundleError as exc:
            self._log(logging.ERROR, "bundle_rejected", reason=str(exc))
            self._status("error", detail=str(exc))
            return
        self._log(logging.INFO, "bundle_installed", model_hash=assembly.model_hash[:12])
        if self._load_bundle() and self.waiting_global is not None:
            g, self.waiting_global = self.waiting_global, None
            self._handle_global(g)  # the global model we had to park
        else:
            self._status("idle")


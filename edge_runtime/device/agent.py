"""The device agent: join a fleet, train on each new global model, deliver the delta for sure.

Shape: MQTT callbacks only put events on a queue; one loop owns all state and handles one
event at a time (a lone device: its MQTT loop on one thread, device/host.py). Nothing a message
contains can crash that loop: a bad message costs one log line.

Delivery is end-to-end. An update is written to the state dir *before* it is first sent, and
re-sent (same bytes, same nonce) after every reconnect and whenever the aggregator announces
the same round again, until the aggregator acknowledges it or closes the round. A broker's
PUBACK proves nothing: mosquitto acknowledges publishes its ACL drops, and amqtt keeps no
queue for offline sessions.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.data import Dataset, load_dataset
from fleetlearn.edge_runtime.core.errors import BundleError, DataError, ProtocolError, UsageError
from fleetlearn.edge_runtime.core.logs import kv
from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import (
    GlobalModel,
    LeaseView,
    Topics,
    Update,
)
from fleetlearn.edge_runtime.core.state_lock import lock_state_dir
from fleetlearn.edge_runtime.device.bundle_fetch import BundleAssembly, try_load_bundle
from fleetlearn.edge_runtime.device.bundle_ota import BundleOverTheAir
from fleetlearn.edge_runtime.device.config import DeviceConfig
from fleetlearn.edge_runtime.device.eligibility import EligibilityGate
from fleetlearn.edge_runtime.device.health import HealthReader
from fleetlearn.edge_runtime.device.host import LoneHost
from fleetlearn.edge_runtime.device.local_round import sit_out_reason, train_round
from fleetlearn.edge_runtime.device.reporting import BUSY_STATUS_EVERY_S, HEALTH_REFRESH_S, DeviceReporting, Event
from fleetlearn.edge_runtime.device.settle import RoundSettling
from fleetlearn.edge_runtime.device.state import (
    DeviceState,
    clear_pending_update,
    load_pending_update,
    recover_pending,
    save_pending_update,
)
from fleetlearn.edge_runtime.device.wire import DeviceWire, decode_global
from fleetlearn.edge_runtime.device.wiring import link_options, load_signer
from fleetlearn.edge_runtime.engines.base import Engine
from fleetlearn.edge_runtime.engines.select import open_engine

if TYPE_CHECKING:
    from fleetlearn.edge_runtime.device.swarm import GroupCommit

log = logging.getLogger("fleetlearn.device")


class DeviceAgent(BundleOverTheAir, DeviceReporting, RoundSettling):
    """One device's protocol logic, driven by events, hosted by `run()` (one device on one thread,
    device/host.py) or by the swarm (device/swarm.py: many agents, one epoll loop), which
    chooses the link (`link_factory`), the event sink (`post`), the engine (`engine_factory`),
    the group commit and the global-model decoder: the state machine is the same code for both."""

    def __init__(
        self,
        cfg: DeviceConfig,
        max_rounds: int | None = None,
        *,
        link_factory: Callable[..., MqttLink] | None = None,
        post: Callable[[Event], None] | None = None,
        service: Callable[[], None] | None = None,
        engine_factory: Callable[..., Engine] = open_engine,
        group_commit: GroupCommit | None = None,
        global_decoder: Callable[[bytes], GlobalModel] = decode_global,  # a swarm shares one (wire.py)
    ):
        self.cfg = cfg
        self.max_rounds = max_rounds
        self.topics = Topics(cfg.fleet)
        self.state_dir = Path(cfg.state_dir)
        # One device process per state dir (two would clobber the pending update): held for life.
        self.state_lock = lock_state_dir(self.state_dir, "device")
        self.state = DeviceState.load(self.state_dir)
        self.wire = DeviceWire(self.state_dir, self.topics, cfg.device_id)  # encodings, parts (device/wire.py)
        self.rounds_done = 0  # rounds this process completed (for --max-rounds)
        self._rounds_counted: set[tuple[str, int]] = set()
        self._unsettled: dict[tuple[str, int, str], None] = {}  # updates the next round settled before their ack
        # Hosted by a swarm (link_factory and post given), or alone on its own thread (device/host.py).
        self.host: LoneHost | None = None
        if link_factory is None:
            self.host = LoneHost()
            link_factory, post, service = self.host.link_factory, post or self.host.post, self.host.service
        self.post = post or (lambda event: None)  # where this device's events go (its host's queue)
        self.service = service  # serves the connection between training steps (keepalive), if the host needs it
        self.state_dirty_since: float | None = None  # a state change waiting for a quiet moment (host.py)
        self._engine_factory = engine_factory
        self._decode_global = global_decoder
        # None: each pending update is fsynced before it is sent. A swarm's GroupCommit: written
        # without fsync, sent after the host's next file-system sync (one for many devices).
        self.group_commit = group_commit
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
        self._fast_rounds = False  # until a local training shows rounds are fast (reporting.py)
        self.health = HealthReader(self.state_dir, cfg.sysfs_root)
        self.gate = EligibilityGate(cfg.eligibility, self.health.read, HEALTH_REFRESH_S)
        self._not_invited: tuple[str, int] = ("", 0)  # the last (run, round) we were not invited to
        self._sat_out: tuple[str, int] = ("", 0)  # the last (run, round) this bundle could not train as asked
        self.link = link_factory(
            link_options(cfg),
            on_message=self._on_message,
            on_connect=lambda: self.post(Event("connected")),
            will_provider=self._last_will,
        )
        self.leader = LeaseView()  # the fleet's leader lease: rounds of any other run are ignored
        for topic in (
            self.topics.leader,
            self.topics.global_model,
            self.topics.global_parts,
            self.topics.round,
            self.topics.ack(cfg.device_id),
            self.topics.bundle,
        ):
            self.link.subscribe(topic, qos=1)

    # ------------------------------------------------------------------ setup

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.post(Event("message", topic, bytes(payload)))

    def _log(self, level: int, event: str, round_: int | None = None, **fields) -> None:
        log.log(level, "%s", kv(event=event, device=self.cfg.device_id, round="-" if round_ is None else round_, **fields))

    def _load_bundle(self) -> bool:
        manifest, reason = try_load_bundle(self.cfg.bundle)
        if manifest is None:
            self.manifest, self.trainer = None, None
            self._log(logging.WARNING, "bundle_unavailable", reason=reason)
            return False
        try:
            self.trainer = self._engine_factory(
                self.cfg.bundle, manifest, self.cfg.training.engine, threads=self.cfg.training.threads
            )
        except (UsageError, RuntimeError, OSError) as exc:  # ORT raises RuntimeError-like errors for bad graphs
            self.manifest, self.trainer = None, None
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self._log(logging.ERROR, "bundle_unusable", reason=reason, engine=self.cfg.training.engine)
            self._status("error", detail=f"bundle unusable: {reason}")
            return False
        self.manifest = manifest
        self.data = None  # preprocessing may have changed with the model
        self._log(
            logging.INFO,
            "bundle_loaded",
            model=manifest.model_name,
            model_hash=manifest.model_hash[:12],
            params=manifest.num_params,
            engine=self.trainer.name,
        )
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
        """Host this one device on this thread (device/host.py): its MQTT loop is its event loop."""
        if self.host is None:
            raise RuntimeError("a hosted device agent is run by its host (the swarm)")
        self._install_signal_handlers()
        return self.host.run(self)

    # The host interface (run() above and the swarm use only these).

    def start(self) -> None:
        """Load the bundle, recover a pending update, start connecting."""
        self._load_bundle()
        self._recover_pending()
        self._log(logging.INFO, "device_start", broker=self.cfg.broker, fleet=self.cfg.fleet, pending=self.state.pending_round)
        self.link.start()

    def handle(self, event: Event) -> None:
        """Handle one event (never raises: a bad message costs one log line)."""
        before = self.rounds_done
        self._dispatch(event)
        if self.done and before < self.rounds_done:
            self._log(logging.INFO, "max_rounds_reached", rounds=self.rounds_done)

    @property
    def done(self) -> bool:
        """True once --max-rounds rounds completed (the host may then close this device)."""
        return self.max_rounds is not None and self.rounds_done >= self.max_rounds

    def close(self) -> None:
        """Write what state waits, say `offline` (retained), disconnect cleanly, release the state dir."""
        self.flush_state()
        self._status("offline", detail="stopped")
        self.link.stop()
        self._log(logging.INFO, "device_stop", rounds=self.rounds_done)
        self.state_lock.release()

    def _recover_pending(self) -> None:
        round_ = recover_pending(self.state_dir, self.state)
        if round_:
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
                if lease is not None and (
                    before is None or (before.token, before.state) != (lease.token, lease.state)
                ):  # not each renewal
                    self._log(logging.INFO, "leader", run_id=lease.run_id[:8], holder=lease.holder, state=lease.state)
            elif event.topic == self.topics.global_model:
                self._on_global(event.payload)
            elif self.wire.is_global_part(event.topic):
                self._on_global(self.wire.global_parts.feed(event.payload))
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
        self._status("idle" if self.status_state in ("idle", "offline", "error") else self.status_state, force=True)
        pending = load_pending_update(self.state_dir) if self.state.pending_round else None
        if pending:
            self._log(logging.INFO, "update_resent", self.state.pending_round, reason="reconnected")
            self._send_update(pending)

    def _on_global(self, payload: bytes | None) -> None:
        if not payload:
            return  # a cleared retained message (or a part of one still incomplete)
        self._handle_global(self._decode_global(payload))

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
            self.wire.feedback.reset()
            self.state = DeviceState(run_id=g.run_id)
            self.state.save(self.state_dir)
        self.state.max_message_size = g.config.max_message_size or 0  # saved with the state's next change
        if not g.train:
            self._status("idle", g.round, "run finished")
            return
        if self.manifest is None or g.model_hash != self.manifest.model_hash:
            self.waiting_global = g
            self._log(
                logging.INFO,
                "model_mismatch",
                g.round,
                wanted=g.model_hash[:12],
                have=self.manifest.model_hash[:12] if self.manifest else "none",
            )
            self._status("fetching", g.round, "waiting for the announced bundle")
            return
        s = self.state
        if g.round < s.seen_round:
            self._went_back(g)  # the aggregator restarted behind a round it had announced (device/settle.py)
        s.seen_round = max(s.seen_round, g.round)  # saved with the state's next change
        if s.pending_round and s.pending_round < g.round:
            # The round moved on; normal since the aggregator acks after its commit, which is
            # after it published this round: settled quietly, its ack may still come.
            self._finish_round(s.pending_round, "", quiet=True)
            if self.done:
                return  # --max-rounds reached: no round after it
        if g.round <= s.last_round:
            return  # already done (a retained global seen again after reconnect)
        if s.pending_round == g.round:
            pending = load_pending_update(self.state_dir)
            if pending and s.pending_base in (0, _crc(g)):  # re-announced (the aggregator restarted): send again
                self._log(logging.INFO, "update_resent", g.round, reason="round re-announced")
                self._send_update(pending)
                return
            if pending:  # the same round on other weights: the aggregator redid the rounds before it
                self._log(logging.WARNING, "update_dropped", g.round, reason="the round was re-announced with other weights")
                self.wire.refused(s.pending_nonce)
                clear_pending_update(self.state_dir)
                s.pending_round, s.pending_nonce, s.pending_base = 0, "", 0
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
        result, delta = train_round(self.trainer, data, self.cfg.training, g, self.cfg.device_id, self.service)
        self._fast_rounds = result.seconds < BUSY_STATUS_EVERY_S
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
        payload = self.wire.encode(
            update, g.config.compression_spec, self.signer.sign if self.signer else None
        )  # as the round asks
        # On disk before it is sent: a crash after this line re-sends these exact bytes. fsynced
        # only with an error-feedback residual (device/state.py says why that is enough).
        save_pending_update(self.state_dir, payload, durable=self.group_commit is None and self.wire.feedback.path.exists())
        s = self.state
        s.pending_round, s.pending_nonce, s.pending_base = g.round, update.nonce, _crc(g)
        self._send_update(payload)  # then the bookkeeping: the update is on its way meanwhile
        self._save_state_later()  # a crash before it is written: recover_pending reads the pending frame
        self._status("uploading", g.round)
        self._log(
            logging.INFO,
            "update_sent",
            g.round,
            samples=result.samples,
            steps=result.steps,
            mu=g.config.proximal_mu or 0,
            loss=f"{result.mean_loss:.4f}",
            train_s=f"{result.seconds:.4f}",
            bytes=len(payload),
        )

    def _save_state_later(self) -> None:
        """Save the state after a send: a lone device's host writes it at the next quiet moment
        (device/host.py: the write, ~0.3-1 ms on ext4, otherwise delays the next global model's
        handling on the round's critical path); a swarm device at once, as before."""
        if self.host is None:
            self.state.save(self.state_dir)
        elif self.state_dirty_since is None:
            self.state_dirty_since = time.monotonic()

    def flush_state(self) -> None:
        """Write the state a send left waiting (the host calls it when the device is quiet)."""
        if self.state_dirty_since is not None:
            self.state_dirty_since = None
            self.state.save(self.state_dir)

    def _send_update(self, payload: bytes) -> None:
        """Publish the pending update: at once when fsynced, else after the host's group commit."""
        # Whole, or in parts over the round's message limit (device/wire.py).
        if self.group_commit is None:
            self.wire.send(self.link, payload, self.state.max_message_size)
        else:
            self.group_commit.after_sync(
                lambda: None if self.wire.send(self.link, payload, self.state.max_message_size) else None
            )


def _crc(g: GlobalModel) -> int:
    """Which global weights an update was trained from (never 0: 0 means unknown)."""
    return zlib.crc32(np.ascontiguousarray(g.weights).data) or 1

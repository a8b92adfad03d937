"""What a device says about itself, and whether it may train: its retained status (state,
health readings, engine, architecture), the Last Will, and the [eligibility] gate.

`DeviceReporting` is a mixin of `agent.DeviceAgent`, kept in its own file so each file has one
job; the attributes it uses are the agent's, declared below for the type checker.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetlearn.edge_runtime.core.mqtt import MqttLink
from fleetlearn.edge_runtime.core.protocol import GlobalModel, Status, Topics
from fleetlearn.edge_runtime.device.config import DeviceConfig
from fleetlearn.edge_runtime.device.eligibility import EligibilityGate
from fleetlearn.edge_runtime.device.health import HealthReader
from fleetlearn.edge_runtime.device.state import DeviceState

HEALTH_REFRESH_S = 60.0  # re-publish the status (fresh health readings) at least this often
# A device whose rounds are fast (its last local training took less than this) going training ->
# uploading -> training ... publishes those at most this often: at a round every few
# milliseconds each would cost a broker message and, worse, a wake of the network thread between
# a global model and its training, and nobody could see them anyway. A slower device publishes
# every phase; a change to any other state (idle, error, ineligible, offline, ...) always goes out.
BUSY_STATES = ("training", "uploading")
BUSY_STATUS_EVERY_S = 1.0


@dataclass(frozen=True)
class Event:
    """One thing for the agent's event loop: an MQTT message, a (re)connect, or "eligible again"."""

    kind: str  # "message" | "connected" | "eligible"
    topic: str = ""
    payload: bytes = b""


class DeviceReporting:
    cfg: DeviceConfig
    link: MqttLink
    topics: Topics
    state: DeviceState
    health: HealthReader
    gate: EligibilityGate
    trainer: Any
    status_state: str
    status_last: tuple[str, int | None, str]
    _status_t: float
    _fast_rounds: bool  # the last local training took less than BUSY_STATUS_EVERY_S
    post: Callable[[Event], None]  # where this device's events go (its host's queue)

    # The agent's (agent.DeviceAgent overrides both).
    def _log(self, level: int, event: str, round_: int | None = None, **fields: Any) -> None:
        raise NotImplementedError

    def _handle_global(self, g: GlobalModel) -> None:
        raise NotImplementedError

    def _last_will(self) -> tuple[str, bytes, int, bool]:
        """The `offline` status the broker publishes for us if we vanish (built per connect)."""
        offline = Status(self.cfg.device_id, "offline", self.state.last_round, "connection lost (last will)", time.time())
        return self.topics.status(self.cfg.device_id), offline.encode(), 1, True

    def _status(self, state: str, round_: int | None = None, detail: str = "", force: bool = False) -> None:
        if state == "ineligible" and not detail and self.status_last[0] == "ineligible":
            detail = self.status_last[2]  # a reconnect re-announces the state: keep its reason
        now = time.monotonic()
        still_busy = (
            self._fast_rounds
            and state in BUSY_STATES
            and self.status_last[0] in BUSY_STATES
            and now - self._status_t < BUSY_STATUS_EVERY_S
        )
        self.status_state = state
        self.status_last = (state, round_, detail)
        if still_busy and not force:
            return  # the retained status already says busy (see BUSY_STATUS_EVERY_S)
        self._status_t = now
        r = self.state.last_round if round_ is None else round_
        health = self.health.read()
        self.link.publish(
            self.topics.status(self.cfg.device_id),
            Status(
                self.cfg.device_id,
                state,
                r,
                detail,
                time.time(),
                health=health,
                engine=self.trainer.name if self.trainer else None,
                arch=platform.machine() or None,
            ).encode(),
            qos=1,
            retain=True,
        )

    def _may_train(self, g: GlobalModel) -> bool:
        """Check [eligibility] before training round g; when it says no, hold g and say why."""
        reason = self.gate.refuse(g)
        if reason is not None:
            self._log(logging.INFO, "ineligible", g.round, reason=reason)
            self._status("ineligible", g.round, reason)
        return reason is None

    def tick(self) -> None:
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
                self.post(Event("eligible"))
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

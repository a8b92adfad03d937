"""What the monitor knows about a fleet: its run, rounds and devices. Pure: no I/O, no clock.

Every input is a decoded message plus the monitor's `now`; every output is a list of
`MonitorEvent`s describing what changed. The live view renders a `FleetState`; `--json`
prints the events. Retained messages are delivered again after every reconnect, so each
`apply_*` emits an event only when something actually changed: a script reading `--json`
sees one event per change, not one per delivery.

"Late" is a judgement only the monitor makes: a device that was online when a round closed
and had not uploaded for it (a device that was offline is "offline", not late), or whose
update arrived after the close. It is judged only for rounds the monitor saw open, since for
a round that closed before the monitor started it cannot know who uploaded in time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlearn.edge_runtime.core.protocol import Ack, Health, RoundMetrics, RoundState, Status
from fleetlearn.monitor_messages import DeviceForgotten, GlobalSeen, Message, UploadSeen

CLOSED_STATES = ("closed", "finished", "failed")
MAX_ROUNDS_KEPT = 500  # a long run must not grow the monitor without bound
MAX_TREND = 120


@dataclass(frozen=True)
class MonitorEvent:
    """One change, as printed by `monitor --json`: {"event": kind, "ts": now, **fields}."""

    event: str
    ts: float
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "ts": round(self.ts, 3), **self.fields}


def metrics_fields(rec: RoundMetrics) -> dict[str, Any]:
    """A round's metrics as flat `monitor --json` fields: the headline test metric under its own name."""
    out: dict[str, Any] = {
        "round": rec.round,
        "run_id": rec.run_id,
        "devices": list(rec.devices),
        "samples": rec.samples,
        "train_loss": rec.train_loss,
    }
    if rec.test_metric:
        out[rec.test_metric] = rec.test_value
    out["test_metric"] = rec.test_metric
    out.update(
        wall_s=rec.wall_s,
        bytes_in=rec.bytes_in,
        bytes_out=rec.bytes_out,
        rejected=rec.rejected,
        deadline_extensions=rec.deadline_extensions,
    )
    if rec.epsilon is not None:
        out.update(epsilon=rec.epsilon, delta=rec.delta)
    return out


@dataclass
class DeviceView:
    device_id: str
    state: str = "unknown"  # a DEVICE_STATES value, or "unknown" (seen only through an upload/ack)
    round: int = 0
    detail: str = ""
    device_ts: float = 0.0  # the device's own clock, as it reported
    seen: float = 0.0  # the monitor's clock at the last message about this device
    uploads: int = 0  # uploads seen by this monitor
    late_rounds: int = 0
    health: Health | None = None  # the device's last health readings (None: it sent none)

    @property
    def online(self) -> bool:
        return self.state != "offline"


@dataclass
class RoundView:
    round: int
    state: str = ""  # "" until a round state (or its metrics) arrives: an upload alone proves nothing
    deadline: float = 0.0
    total_rounds: int = 0
    min_devices: int = 0
    target_devices: int = 0
    accepted: int = 0
    reason: str = ""
    seen_open: bool = False  # the monitor saw this round open, so it can judge lateness
    opened_at: float | None = None
    closed_at: float | None = None
    uploaded: dict[str, float] = field(default_factory=dict)  # device -> monitor time of upload
    late: set[str] = field(default_factory=set)
    acks: dict[str, bool] = field(default_factory=dict)
    metrics: RoundMetrics | None = None

    @property
    def closed(self) -> bool:
        return self.state in CLOSED_STATES

    def seconds_left(self, now: float) -> float | None:
        """Time to the deadline while open; None when closed or no deadline is known."""
        if self.closed or self.deadline <= 0:
            return None
        return self.deadline - now


@dataclass(frozen=True)
class DeviceCounts:
    total: int
    online: int
    training: int
    uploaded: int  # uploaded for the current round
    late: int  # late in the most recent round judged
    offline: int
    ineligible: int = 0  # online but kept from training by their [eligibility] rules


class FleetState:
    """The monitor's picture of one fleet, fed one message at a time."""

    def __init__(self, fleet: str):
        self.fleet = fleet
        self.run_id = ""
        self.total_rounds = 0
        self.model_hash = ""
        self.connected = False
        self.link_error = ""
        self.rounds: dict[int, RoundView] = {}
        self.devices: dict[str, DeviceView] = {}
        self.late_round: int | None = None  # the latest round whose late devices were judged
        self.ignored = 0  # messages rejected by the decoders
        self._global_key: tuple | None = None  # the last global model header reported

    # ------------------------------------------------------------------ link

    def set_connected(self, now: float) -> list[MonitorEvent]:
        self.connected, self.link_error = True, ""
        return [MonitorEvent("connected", now)]

    def set_disconnected(self, reason: str, now: float) -> list[MonitorEvent]:
        if not self.connected:
            return []
        self.connected = False
        return [MonitorEvent("disconnected", now, {"reason": reason})]

    def set_link_error(self, error: str, now: float) -> list[MonitorEvent]:
        if error == self.link_error:
            return []
        self.link_error = error
        return [MonitorEvent("link_error", now, {"reason": error})] if error else []

    def invalid(self, topic: str, reason: str, now: float) -> list[MonitorEvent]:
        self.ignored += 1
        return [MonitorEvent("ignored", now, {"topic": topic, "reason": reason})]

    # ------------------------------------------------------------------ messages

    def apply(self, msg: Message, now: float) -> list[MonitorEvent]:
        if isinstance(msg, RoundState):
            return self.apply_round(msg, now)
        if isinstance(msg, Status):
            return self.apply_status(msg, now)
        if isinstance(msg, UploadSeen):
            return self.apply_upload(msg, now)
        if isinstance(msg, Ack):
            return self.apply_ack(msg, now)
        if isinstance(msg, RoundMetrics):
            return self.apply_metrics(msg, now)
        if isinstance(msg, GlobalSeen):
            return self.apply_global(msg, now)
        if isinstance(msg, DeviceForgotten):
            return self.forget_device(msg.device_id, now)
        return []

    def _switch_run(self, run_id: str, now: float) -> list[MonitorEvent]:
        """A new aggregator run restarts round numbering: forget the old run's rounds."""
        if run_id == self.run_id:
            return []
        self.run_id = run_id
        self.rounds.clear()
        self.late_round = None
        return [MonitorEvent("run", now, {"run_id": run_id})]

    def _round(self, number: int) -> RoundView:
        view = self.rounds.get(number)
        if view is None:
            view = self.rounds[number] = RoundView(number)
            for old in sorted(self.rounds)[:-MAX_ROUNDS_KEPT]:
                del self.rounds[old]
        return view

    def apply_round(self, rs: RoundState, now: float) -> list[MonitorEvent]:
        events = self._switch_run(rs.run_id, now)
        self.total_rounds = rs.total_rounds or self.total_rounds
        view = self._round(rs.round)
        before = (view.state, view.deadline, view.accepted, view.min_devices, view.target_devices, view.reason, view.total_rounds)
        was_closed = view.closed and view.closed_at is not None
        view.state, view.deadline, view.accepted = rs.state, rs.deadline, rs.accepted
        view.min_devices, view.target_devices, view.reason, view.total_rounds = (
            rs.min_devices,
            rs.target_devices,
            rs.reason,
            rs.total_rounds,
        )
        changed = before != (
            view.state,
            view.deadline,
            view.accepted,
            view.min_devices,
            view.target_devices,
            view.reason,
            view.total_rounds,
        )
        if rs.state == "open":
            if not view.seen_open:
                view.seen_open, view.opened_at = True, now
            view.closed_at = None
        elif not was_closed:
            view.closed_at = now
        if changed or events:
            events.append(
                MonitorEvent(
                    "round",
                    now,
                    {
                        "run_id": rs.run_id,
                        "round": rs.round,
                        "state": rs.state,
                        "deadline": rs.deadline,
                        "total_rounds": rs.total_rounds,
                        "min_devices": rs.min_devices,
                        "target_devices": rs.target_devices,
                        "accepted": rs.accepted,
                        "reason": rs.reason,
                    },
                )
            )
        if view.closed and view.seen_open and not was_closed:
            events += self._judge_late(view, now)
        return events

    def _judge_late(self, view: RoundView, now: float) -> list[MonitorEvent]:
        events = []
        for dev in sorted(self.devices.values(), key=lambda d: d.device_id):
            if dev.online and dev.device_id not in view.uploaded and dev.device_id not in view.late:
                view.late.add(dev.device_id)
                dev.late_rounds += 1
                events.append(
                    MonitorEvent(
                        "late",
                        now,
                        {
                            "round": view.round,
                            "device_id": dev.device_id,
                            "late": True,
                            "reason": "no upload before the round closed",
                        },
                    )
                )
        self.late_round = max(self.late_round or 0, view.round)
        return events

    def _device(self, device_id: str) -> DeviceView:
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = DeviceView(device_id)
        return dev

    def apply_status(self, st: Status, now: float) -> list[MonitorEvent]:
        dev = self._device(st.device_id)
        previous = dev.state
        changed = (dev.state, dev.round, dev.detail) != (st.state, st.round, st.detail)
        dev.state, dev.round, dev.detail, dev.device_ts, dev.seen = st.state, st.round, st.detail, st.ts, now
        dev.health = st.health or dev.health  # the Last Will carries none: keep the last readings
        if not changed:
            return []  # a heartbeat with fresh readings: the view shows them, no event
        fields = {"device_id": st.device_id, "state": st.state, "previous": previous, "round": st.round, "detail": st.detail}
        if st.health is not None:
            fields["health"] = st.health.to_json()
        return [MonitorEvent("device", now, fields)]

    def forget_device(self, device_id: str, now: float) -> list[MonitorEvent]:
        if self.devices.pop(device_id, None) is None:
            return []
        return [
            MonitorEvent(
                "device",
                now,
                {"device_id": device_id, "state": "removed", "previous": "", "round": 0, "detail": "retained status cleared"},
            )
        ]

    def apply_upload(self, up: UploadSeen, now: float) -> list[MonitorEvent]:
        if self.run_id and up.run_id != self.run_id:
            return []  # a re-send for an earlier run; the aggregator ignores it too
        self._device(up.device_id).seen = now
        view = self._round(up.round)
        if up.device_id in view.uploaded:
            return []  # a re-send of the same update (after a reconnect)
        events = [
            MonitorEvent("upload", now, {"device_id": up.device_id, "round": up.round, "bytes": up.bytes, "late": view.closed})
        ]
        return events + self._mark_uploaded(view, up.device_id, now, "upload arrived after the round closed")

    def apply_ack(self, ack: Ack, now: float) -> list[MonitorEvent]:
        if self.run_id and ack.run_id != self.run_id:
            return []
        view = self._round(ack.round)
        if view.acks.get(ack.device_id) == ack.accepted:
            return []
        view.acks[ack.device_id] = ack.accepted
        events = [
            MonitorEvent(
                "ack", now, {"device_id": ack.device_id, "round": ack.round, "accepted": ack.accepted, "reason": ack.reason}
            )
        ]
        # An ack proves the aggregator got an upload, even one this monitor did not see
        # (--no-updates). The aggregator acks before it announces the close, so an ack that
        # follows the close answers a late update.
        if ack.device_id not in view.uploaded:
            events += self._mark_uploaded(view, ack.device_id, now, "its update was answered after the round closed")
        return events

    def _mark_uploaded(self, view: RoundView, device_id: str, now: float, late_reason: str) -> list[MonitorEvent]:
        dev = self._device(device_id)
        view.uploaded[device_id] = now
        dev.uploads += 1
        if not view.closed or device_id in view.late:
            return []
        view.late.add(device_id)
        dev.late_rounds += 1
        return [MonitorEvent("late", now, {"round": view.round, "device_id": device_id, "late": True, "reason": late_reason})]

    def apply_metrics(self, rec: RoundMetrics, now: float) -> list[MonitorEvent]:
        events: list[MonitorEvent] = []
        if rec.run_id and rec.run_id != self.run_id:
            if self.run_id:
                return []  # retained metrics of a previous run, delivered before its round state
            events += self._switch_run(rec.run_id, now)
        view = self._round(rec.round)
        if view.metrics == rec:
            return events
        view.metrics = rec
        view.state = view.state or "closed"  # metrics are published once a round has closed
        for device in rec.devices:
            view.uploaded.setdefault(device, now)
            # The aggregator counted it, so it was in time: our "late" came from seeing the
            # close before its update (two publishers, no ordering between them).
            if device in view.late:
                view.late.discard(device)
                if device in self.devices:
                    self.devices[device].late_rounds -= 1
                events.append(
                    MonitorEvent(
                        "late",
                        now,
                        {"round": rec.round, "device_id": device, "late": False, "reason": "counted by the aggregator after all"},
                    )
                )
        events.append(MonitorEvent("metrics", now, metrics_fields(rec)))
        return events

    def apply_global(self, g: GlobalSeen, now: float) -> list[MonitorEvent]:
        events = self._switch_run(g.run_id, now)
        key = (g.round, g.model_hash, g.train, g.total_rounds)
        if not events and key == self._global_key:
            return []
        self._global_key = key
        self.model_hash = g.model_hash
        self.total_rounds = g.total_rounds or self.total_rounds
        events.append(
            MonitorEvent(
                "global",
                now,
                {
                    "run_id": g.run_id,
                    "round": g.round,
                    "model_hash": g.model_hash,
                    "train": g.train,
                    "total_rounds": g.total_rounds,
                    "deadline": g.deadline,
                },
            )
        )
        return events

    # ------------------------------------------------------------------ queries

    def current_round(self) -> RoundView | None:
        """The newest round with a known state (a stray upload for round 99 does not make it current)."""
        known = [k for k, v in self.rounds.items() if v.state]
        return self.rounds[max(known)] if known else None

    def recent_rounds(self, n: int) -> list[RoundView]:
        """The last `n` rounds, oldest first. The aggregator announces the end of a run as
        round N+1 "finished"; that marker is no round and is left out."""
        views = [self.rounds[k] for k in sorted(self.rounds)]
        views = [v for v in views if v.state and (v.state != "finished" or v.metrics or v.uploaded)]
        return views[-n:] if n > 0 else []

    def counts(self) -> DeviceCounts:
        devices = list(self.devices.values())
        current = self.current_round()
        late_view = self.rounds.get(self.late_round) if self.late_round is not None else None
        return DeviceCounts(
            total=len(devices),
            online=sum(d.online for d in devices),
            training=sum(d.state == "training" for d in devices),
            uploaded=len(current.uploaded) if current else 0,
            late=len(late_view.late) if late_view else 0,
            offline=sum(not d.online for d in devices),
            ineligible=sum(d.state == "ineligible" for d in devices),
        )

    def trend(self) -> tuple[str | None, list[float]]:
        """The test metric's name and its values, oldest round first (the sparkline's data)."""
        records = [v.metrics for k, v in sorted(self.rounds.items()) if v.metrics and v.metrics.test_value is not None]
        if not records:
            return None, []
        name = records[-1].test_metric
        return name, [r.test_value for r in records if r.test_metric == name and r.test_value is not None][-MAX_TREND:]

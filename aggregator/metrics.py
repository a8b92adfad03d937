"""Prometheus metrics for a fleet, through the official `prometheus-client` library.

    exporter = MetricsExporter(per_device=False)        # its own CollectorRegistry: no global state
    agg.events.listen(exporter.on_event)                # an aggregator event listener (events.py)
    server = exporter.serve("127.0.0.1", 9108)          # GET /metrics; server.close() at the end

Every series comes from an aggregator event (engine thread) or a device's retained status
(`device_status` events; the monitor feeds the same `DeviceGauges` from the statuses it reads),
never from a second look at the state dir. The series:

    fleetlearn_round                         gauge    last closed round
    fleetlearn_open_round                    gauge    the round open now (0 between runs)
    fleetlearn_rounds_total{outcome}         counter  closed | failed
    fleetlearn_round_duration_seconds        histogram a round's wall time, open to close
    fleetlearn_round_accepted_updates        gauge    accepted updates of the last closed round
    fleetlearn_round_target_devices          gauge    the round's target (participation = accepted / target)
    fleetlearn_updates_total{result,reason}  counter  accepted|rejected; reason from REJECTION_REASONS
    fleetlearn_devices{state}                gauge    devices per status state (DEVICE_STATES + unknown)
    fleetlearn_test_metric{name}             gauge    the last closed round's test metric (test_mse, ...)
    fleetlearn_train_loss                    gauge    the last closed round's mean training loss
    fleetlearn_bytes_total{direction}        counter  in | out: the rounds' update and model/ack bytes
    fleetlearn_dp_epsilon                    gauge    (epsilon, delta)-DP spent so far, only when DP is on
    fleetlearn_deadline_extensions_total     counter
  with --metrics-per-device (one series per device: mind the cardinality of a large fleet):
    fleetlearn_device_updates_total{device,result}
    fleetlearn_device_state{device,state}    gauge    1 for the device's current state

Labels never carry free text: a rejection's reason is mapped to a small fixed set
(`rejection_reason`), device ids appear only behind --metrics-per-device.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import DEVICE_STATES, RoundMetrics

NAMESPACE = "fleetlearn"
UNKNOWN_STATE = "unknown"
# The states fleetlearn_devices is exported for (zero when no device is in one): the protocol's
# own list, so a state added there (e.g. `ineligible`) is exported without an edit here.
DEVICE_STATE_LABELS = (*DEVICE_STATES, UNKNOWN_STATE)

# Rejection reasons as a fixed label set; the first rule whose words appear in the reason wins.
REJECTION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("replay", ("replay:",)),
    ("signature", ("signature", "signed updates", "signing key")),
    ("duplicate", ("duplicate update",)),
    ("stale", ("closed (stale",)),
    ("not_open", ("not open",)),
    ("wrong_run", ("is not the current run",)),
    ("wrong_model", ("is not the current model", "parameters, the model has")),
    ("identity", ("does not match the topic", "invalid device id", "is not a update topic")),
    ("too_large", ("-byte bound", "exceeds the")),
    (
        "malformed",
        (
            "empty payload",
            "field ",
            "crc",
            "magic",
            "frame",
            "header",
            "meta",
            "not finite",
            "nan",
            "truncated",
            "wire version",
            "kind",
            "encoding",
            "body",
        ),
    ),
)
REJECTION_REASONS = tuple(name for name, _ in REJECTION_RULES) + ("other",)


def rejection_reason(reason: str) -> str:
    """The fixed label for a rejection's free-text reason ("other" when no rule matches)."""
    text = str(reason).lower()
    for name, words in REJECTION_RULES:
        if any(w in text for w in words):
            return name
    return "other"


# Status.health readings -> per-device gauge names (edge_runtime/core/protocol/status.py: Health).
HEALTH_GAUGES = (
    ("cpu_temp_c", "cpu_temp_celsius", "A device's hottest CPU thermal zone"),
    ("rss_bytes", "rss_bytes", "Resident memory of a device's agent process"),
    ("free_disk_bytes", "free_disk_bytes", "Free space on a device's state dir filesystem"),
    ("uptime_s", "uptime_seconds", "Seconds since a device's agent process started"),
)


class DeviceGauges:
    """fleetlearn_devices{state} (and, per device, fleetlearn_device_state) from statuses.

    Shared by the aggregator's exporter and `fleetlearn monitor --metrics-port`: feed it
    `update(device, state, health)` for every status seen (`state=None`: the status was cleared;
    `health`: the status's Health readings as a dict). Per device (--metrics-per-device only, for
    cardinality) the health readings become gauges too; a reading the board does not expose is
    absent from the status, so its series is removed rather than guessed."""

    def __init__(self, registry: CollectorRegistry, per_device: bool = False):
        self.per_device = per_device
        self.states: dict[str, str] = {}
        self._lock = threading.Lock()
        self.devices = Gauge(
            f"{NAMESPACE}_devices", "Devices by the state of their retained status", ["state"], registry=registry
        )
        for s in DEVICE_STATE_LABELS:
            self.devices.labels(state=s).set(0)
        self.device_state = (
            Gauge(
                f"{NAMESPACE}_device_state",
                "1 for the state a device reports now (--metrics-per-device)",
                ["device", "state"],
                registry=registry,
            )
            if per_device
            else None
        )
        self.health = (
            {
                key: Gauge(f"{NAMESPACE}_device_{name}", f"{what} (--metrics-per-device)", ["device"], registry=registry)
                for key, name, what in HEALTH_GAUGES
            }
            if per_device
            else {}
        )

    def update(self, device: str, state: str | None, health: dict[str, Any] | None = None) -> None:
        state = state if state is None or state in DEVICE_STATE_LABELS else UNKNOWN_STATE
        with self._lock:
            for key, gauge in self.health.items():
                value = (health or {}).get(key) if state is not None else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    gauge.labels(device=device).set(value)
                else:
                    try:
                        gauge.remove(device)
                    except KeyError:
                        pass
            before = self.states.pop(device, None)
            if state is not None:
                self.states[device] = state
            counts = {s: 0 for s in DEVICE_STATE_LABELS}
            for s in self.states.values():
                counts[s] += 1
            for s, n in counts.items():
                self.devices.labels(state=s).set(n)
            if self.device_state is not None and before != state:
                if before is not None:
                    self.device_state.remove(device, before)
                if state is not None:
                    self.device_state.labels(device=device, state=state).set(1)


class MetricsExporter:
    """The aggregator's metrics: an event listener (`on_event`) over its own registry."""

    def __init__(self, per_device: bool = False, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.per_device = per_device
        self.round = Gauge(f"{NAMESPACE}_round", "Last closed round", registry=r)
        self._last_round = 0
        self._open_round = 0
        self._seen_open = False  # only the first round_open this exporter sees can be a resume
        self.open_round = Gauge(f"{NAMESPACE}_open_round", "The round open now (0 when none is)", registry=r)
        self.rounds = Counter(f"{NAMESPACE}_rounds", "Rounds that ended, by outcome", ["outcome"], registry=r)
        self.duration = Histogram(
            f"{NAMESPACE}_round_duration_seconds",
            "Wall time of a round, open to close",
            registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.accepted_round = Gauge(
            f"{NAMESPACE}_round_accepted_updates", "Accepted updates of the last closed round", registry=r
        )
        self.target = Gauge(f"{NAMESPACE}_round_target_devices", "Accepted updates a round closes at (its target)", registry=r)
        self.updates = Counter(
            f"{NAMESPACE}_updates",
            "Updates answered, by result and (for rejections) a fixed reason",
            ["result", "reason"],
            registry=r,
        )
        self.test_metric = Gauge(f"{NAMESPACE}_test_metric", "The last closed round's test metric", ["name"], registry=r)
        self.train_loss = Gauge(f"{NAMESPACE}_train_loss", "The last closed round's sample-weighted training loss", registry=r)
        self.bytes = Counter(
            f"{NAMESPACE}_bytes", "Round payload bytes: updates in, global models and acks out", ["direction"], registry=r
        )
        self.extensions = Counter(f"{NAMESPACE}_deadline_extensions", "Round deadlines extended for lack of devices", registry=r)
        self.epsilon: Gauge | None = None  # created at the first round that reports epsilon (DP on)
        self.devices = DeviceGauges(r, per_device)
        self.device_updates = (
            Counter(
                f"{NAMESPACE}_device_updates",
                "Updates answered per device (--metrics-per-device)",
                ["device", "result"],
                registry=r,
            )
            if per_device
            else None
        )
        # Every fixed label combination exists from the start, so rate() and dashboards see 0, not "no data".
        self.updates.labels(result="accepted", reason="none")
        for reason in REJECTION_REASONS:
            self.updates.labels(result="rejected", reason=reason)
        for outcome in ("closed", "failed"):
            self.rounds.labels(outcome=outcome)
        for direction in ("in", "out"):
            self.bytes.labels(direction=direction)

    # ------------------------------------------------------------ the listener

    def on_event(self, name: str, fields: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(fields)

    def _on_round_open(self, f: dict[str, Any]) -> None:
        rnd = int(f.get("round") or 0)
        self.open_round.set(rnd)
        self._open_round = rnd
        self.target.set(int(f.get("target_devices") or 0))
        # Resumed: the rounds before the first one opened closed in an earlier process. Any later
        # round_open comes before the previous round's round_closed (round r+1 opens while r is
        # made durable), so it must not claim r closed: that waits for round_closed, after r's acks.
        if not self._seen_open and rnd - 1 > self._last_round:
            self._last_round = rnd - 1
            self.round.set(rnd - 1)
        self._seen_open = True

    def _on_update_accepted(self, f: dict[str, Any]) -> None:
        self.updates.labels(result="accepted", reason="none").inc()
        if self.device_updates is not None and f.get("device"):
            self.device_updates.labels(device=str(f["device"]), result="accepted").inc()

    def _on_update_rejected(self, f: dict[str, Any]) -> None:
        self.updates.labels(result="rejected", reason=rejection_reason(str(f.get("reason", "")))).inc()
        if self.device_updates is not None and f.get("device") not in (None, "?"):
            self.device_updates.labels(device=str(f["device"]), result="rejected").inc()

    def _on_round_extended(self, f: dict[str, Any]) -> None:
        self.extensions.inc()

    def _on_round_closed(self, record: dict[str, Any]) -> None:
        rec = RoundMetrics.from_doc(record)
        self._last_round = rec.round
        self.round.set(rec.round)
        if self._open_round == rec.round:  # round_closed comes once the commit is durable: the next may be open
            self.open_round.set(0)
            self._open_round = 0
        self.rounds.labels(outcome="closed").inc()
        if rec.wall_s is not None:
            self.duration.observe(rec.wall_s)
        self.accepted_round.set(len(rec.devices) if rec.devices else int(record.get("accepted") or 0))
        if rec.test_metric and rec.test_value is not None:
            self.test_metric.labels(name=rec.test_metric).set(rec.test_value)
        if rec.train_loss is not None:
            self.train_loss.set(rec.train_loss)
        self.bytes.labels(direction="in").inc(max(0, rec.bytes_in or 0))
        self.bytes.labels(direction="out").inc(max(0, rec.bytes_out or 0))
        if rec.epsilon is not None:
            if self.epsilon is None:
                self.epsilon = Gauge(
                    f"{NAMESPACE}_dp_epsilon", "(epsilon, delta)-DP spent so far (DP runs only)", registry=self.registry
                )
            self.epsilon.set(rec.epsilon)

    def _on_round_failed(self, f: dict[str, Any]) -> None:
        self.rounds.labels(outcome="failed").inc()
        self.open_round.set(0)

    def _on_finished(self, f: dict[str, Any]) -> None:
        self.open_round.set(0)

    def _on_device_status(self, f: dict[str, Any]) -> None:
        device = f.get("device")
        if device:
            state = f.get("state")
            health = {key: f[key] for key, _, _ in HEALTH_GAUGES if key in f}
            self.devices.update(str(device), None if state == "removed" else str(state), health)

    # ------------------------------------------------------------ serving

    def serve(self, host: str, port: int) -> MetricsServer:
        return MetricsServer.start(self.registry, host, port)


class MetricsServer:
    """prometheus-client's own HTTP exposition of one registry, in a daemon thread."""

    def __init__(self, server: Any, thread: threading.Thread):
        self.server, self.thread = server, thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        if not 0 <= port <= 65535:
            raise UsageError(f"--metrics-port must be in [0, 65535], got {port}")
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port {port} on {host}: {exc.strerror or exc}") from None
        return cls(server, thread)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Watch a fleet live: the current round and its deadline, devices online / training /
uploaded / late / offline, the last rounds' numbers and the test metric's trend.

Starts at any time (everything that matters is retained on the broker) and survives broker
restarts (it reconnects and reads the retained state again). `--json` prints one JSON object
per change on stdout for scripts; see docs/monitoring.md for the event schema.
"""

from __future__ import annotations

import argparse
import logging
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from fleetlearn.edge_runtime.core.errors import UsageError

if TYPE_CHECKING:  # only for annotations: `fleetlearn --help` must not import paho or rich
    from fleetlearn.edge_runtime.core.mqtt import LinkOptions
    from fleetlearn.monitor_state import FleetState, MonitorEvent

log = logging.getLogger("fleetlearn.monitor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="broker URL, mqtt://host:1883 or mqtts://host:8883")
    parser.add_argument("--fleet", default="default", help="fleet name (default: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per event on stdout instead of the live view")
    parser.add_argument("--username", help="MQTT username")
    parser.add_argument("--password-file", help="file holding the MQTT password")
    parser.add_argument("--ca-file", help="CA certificate to verify an mqtts:// broker")
    parser.add_argument("--rounds", type=int, default=10, help="rounds shown in the live table (default 10)")
    parser.add_argument(
        "--no-updates",
        action="store_true",
        help="do not subscribe to device updates (saves their bandwidth; uploads are then seen through acks)",
    )
    from fleetlearn.aggregator.service_args import add_metrics_arguments

    add_metrics_arguments(
        parser.add_argument_group(
            "Prometheus metrics: the device gauges, for hosts without an aggregator (docs/operations-service.md)"
        )
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="stderr log level (default warning)"
    )


# ---------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class Inbound:
    """What the network thread hands the main loop: a message or a link change."""

    kind: str  # "message" | "connected" | "disconnected"
    topic: str = ""
    payload: bytes = b""
    reason: str = ""


class Sink(Protocol):
    """Where the loop sends what happened: `emit` gets each batch of events, `refresh` is
    called after every batch and every idle tick (for anything time-dependent)."""

    def emit(self, events: list[MonitorEvent]) -> None: ...
    def refresh(self, now: float) -> None: ...


def _read_password(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"--password-file {path}: {exc.strerror or exc}") from None


class Monitor:
    """Owns the link and the state; one loop in the caller's thread applies every message.

    Network callbacks only enqueue (as in the device agent), so the state is touched by one
    thread and a slow terminal never stalls the MQTT socket.
    """

    def __init__(
        self,
        fleet: str,
        link_options: LinkOptions,
        subscribe_updates: bool = True,
        clock: Callable[[], float] = time.time,
        device_gauges: Any = None,
    ):
        from fleetlearn.edge_runtime.core.mqtt import MqttLink
        from fleetlearn.edge_runtime.core.protocol import Topics
        from fleetlearn.monitor_messages import Parts
        from fleetlearn.monitor_state import FleetState

        self.topics = Topics(fleet)
        self.state = FleetState(fleet)
        self.parts = Parts(self.topics)  # messages over --max-message-size, put back together
        self.device_gauges = device_gauges  # fleetlearn.aggregator.metrics.DeviceGauges with --metrics-port
        self.clock = clock
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.link = MqttLink(
            link_options,
            on_message=lambda t, p: self.inbox.put(Inbound("message", t, bytes(p))),
            on_connect=lambda: self.inbox.put(Inbound("connected")),
            on_disconnect=lambda r: self.inbox.put(Inbound("disconnected", reason=r)),
        )
        t = self.topics
        for topic in (t.round, t.metrics, t.global_model, t.global_parts, t.all_status, f"{t.base}/ack/+"):
            self.link.subscribe(topic, qos=1)
        if subscribe_updates:
            # QoS 0: the monitor only counts uploads; the broker should not queue deltas for it.
            self.link.subscribe(t.all_updates, qos=0)

    def handle(self, item: Inbound) -> list[MonitorEvent]:
        from fleetlearn.edge_runtime.core.errors import ProtocolError
        from fleetlearn.monitor_messages import decode_message

        now = self.clock()
        if item.kind == "connected":
            return self.state.set_connected(now)
        if item.kind == "disconnected":
            return self.state.set_disconnected(item.reason, now)
        try:
            whole = self.parts.whole(item.topic, item.payload, time.monotonic())
            if whole is None:
                return []
            msg = decode_message(self.topics, *whole)
        except ProtocolError as exc:
            log.warning("event=message_ignored topic=%s reason=%r", item.topic, exc.reason)
            return self.state.invalid(item.topic, exc.reason, now)
        if self.device_gauges is not None:
            self._export(msg)
        return self.state.apply(msg, now)

    def _export(self, msg: object) -> None:
        from fleetlearn.edge_runtime.core.protocol import Status
        from fleetlearn.monitor_messages import DeviceForgotten

        if isinstance(msg, Status):
            self.device_gauges.update(msg.device_id, msg.state, msg.health.to_json() if msg.health is not None else None)
        elif isinstance(msg, DeviceForgotten):
            self.device_gauges.update(msg.device_id, None)

    def run(self, sink: Sink, stop: threading.Event, tick: float = 0.25) -> None:
        self.link.start()
        try:
            while not stop.is_set():
                events: list[MonitorEvent] = []
                try:
                    events += self.handle(self.inbox.get(timeout=tick))
                    # Drain a burst (retained state after a connect) before redrawing once.
                    for _ in range(500):
                        events += self.handle(self.inbox.get_nowait())
                except queue.Empty:
                    pass
                if not self.state.connected:
                    events += self.state.set_link_error(self.link.last_error, self.clock())
                sink.emit(events)
                sink.refresh(self.clock())
        finally:
            self.link.stop(timeout=1.0)


class JsonSink:
    """One compact JSON object per line, flushed, so a pipe sees each event at once."""

    def __init__(self, stream: TextIO, stop: threading.Event):
        self.stream = stream
        self.stop = stop

    def emit(self, events: list[MonitorEvent]) -> None:
        import json

        try:
            for e in events:
                self.stream.write(json.dumps(e.to_json(), separators=(",", ":"), allow_nan=False) + "\n")
            if events:
                self.stream.flush()
        except BrokenPipeError:
            # The reader (`| head`, a script) is gone: nothing left to monitor for. Point
            # stdout at /dev/null so the interpreter's final flush does not fail again.
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stop.set()

    def refresh(self, now: float) -> None:
        pass


class LiveSink:
    """The rich Live screen: redrawn after events, else once a second for the countdown.

    Not on every tick: a full-screen redraw is tens of kilobytes, and an operator watching
    over SSH on a field link should not pay that four times a second for nothing new.
    """

    def __init__(self, live, state: FleetState, broker: str, rounds: int, idle_redraw_s: float = 1.0):
        self.live, self.state, self.broker, self.rounds = live, state, broker, rounds
        self.idle_redraw_s = idle_redraw_s
        self._dirty = True
        self._drawn_at = float("-inf")

    def emit(self, events: list[MonitorEvent]) -> None:
        self._dirty = self._dirty or bool(events)

    def refresh(self, now: float) -> None:
        from fleetlearn.monitor_view import render

        if not self._dirty and now - self._drawn_at < self.idle_redraw_s:
            return
        self.live.update(render(self.state, now, self.broker, self.rounds), refresh=True)
        self._dirty, self._drawn_at = False, now


# ---------------------------------------------------------------------- command


def _setup_logging(level: str) -> None:
    import sys

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import sys

    from fleetlearn.edge_runtime.core.mqtt import BrokerURL, LinkOptions
    from fleetlearn.edge_runtime.core.protocol import NAME_RE

    if not NAME_RE.fullmatch(args.fleet):
        raise UsageError(f"--fleet {args.fleet!r} is not a valid fleet name (letters, digits, '.', '_', '-')")
    if args.rounds < 1:
        raise UsageError("--rounds must be >= 1")
    BrokerURL.parse(args.broker)  # a ConfigError (a UsageError) for a malformed URL, before any thread starts
    if args.ca_file and not Path(args.ca_file).is_file():
        raise UsageError(f"--ca-file {args.ca_file}: no such file")
    opts = LinkOptions(
        url=args.broker,
        client_id=f"fleetlearn-monitor-{args.fleet}-{secrets.token_hex(4)}",  # unique: two monitors must not kick each other off
        username=args.username,
        password=_read_password(args.password_file),
        ca_file=args.ca_file,
        clean_session=True,  # a monitor needs no queued messages: it re-reads the retained state
        keepalive=15,
        backoff_max=5.0,  # one operator client, no herd to spread: come back quickly
    )
    gauges, server = _metrics(args)
    monitor = Monitor(args.fleet, opts, subscribe_updates=not args.no_updates, device_gauges=gauges)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.json:
            _setup_logging(args.log_level)
            monitor.run(JsonSink(sys.stdout, stop), stop)
        else:
            from rich.console import Console
            from rich.live import Live

            with Live(console=Console(), auto_refresh=False, screen=True, transient=False) as live:
                # After Live took over stderr: a log line then goes through rich, not across the screen.
                _setup_logging(args.log_level)
                monitor.run(LiveSink(live, monitor.state, args.broker, args.rounds), stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
    return 0


def _metrics(args: argparse.Namespace) -> tuple[Any, Any]:
    """--metrics-port: the aggregator's device gauges (one code for both), served; else (None, None)."""
    if args.metrics_port is None:
        return None, None
    try:
        from prometheus_client import CollectorRegistry

        from fleetlearn.aggregator.metrics import DeviceGauges, MetricsServer
    except ImportError as exc:
        raise UsageError(f"--metrics-port needs prometheus-client (the server extra): {exc}") from None
    registry = CollectorRegistry()
    gauges = DeviceGauges(registry, per_device=args.metrics_per_device)
    return gauges, MetricsServer.start(registry, args.metrics_host, args.metrics_port)

"""One function that both logs and notifies an event, so the two can never drift apart.

    events = Events(on_event)                       # on_event(name, fields) or None
    events.emit("round_failed", 3, level=logging.ERROR, reason="...")       # log line + callback
    events.log("update_duplicate", 3, device="pi-07", nonce="ab12cd34")     # log line only

Each event is one `key=value` line on the `fleetlearn.aggregator` logger:
`event=NAME [device=D] round=R key=value ...` (round `-` outside rounds). The callback (the
Python API's `on_event`, and later the Prometheus exporter) runs on the engine's thread with
the same fields plus `round` (and `device`); an exception in it is logged, never raised. More
listeners (a metrics exporter) join with `events.listen(callback)`.
`notify=` replaces the callback's fields when they differ from the log line's (a round's full
record for round_closed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fleetlearn.aggregator.logs import kv

log = logging.getLogger("fleetlearn.aggregator")

# Events the callback receives (the others are log lines only).
# `device_status` only when the engine watches device statuses (Aggregator.watch_devices).
NOTIFIED = (
    "round_open",
    "update_accepted",
    "update_rejected",
    "round_extended",
    "round_closed",
    "round_failed",
    "finished",
    "device_status",
)

EventCallback = Callable[[str, dict[str, Any]], None]


class Events:
    def __init__(self, on_event: EventCallback | None = None):
        self.listeners: list[EventCallback] = [on_event] if on_event is not None else []

    def listen(self, callback: EventCallback) -> None:
        """Also hand every emitted event to `callback` (on the engine's thread)."""
        self.listeners.append(callback)

    def log(self, event: str, rnd: int | None, device: str | None = None, level: int = logging.INFO, **fields: Any) -> None:
        """One line: `event=... [device=...] round=... key=value...` (not even formatted when the
        level is off: `update_accepted` is one event per update)."""
        if log.isEnabledFor(level):
            log.log(level, "%s", kv(event=event, device=device, round=rnd if rnd is not None else "-", **fields))

    def emit(
        self,
        event: str,
        rnd: int | None,
        device: str | None = None,
        level: int = logging.INFO,
        notify: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Log the event and hand it to the callback."""
        self.log(event, rnd, device, level, **fields)
        if not self.listeners:
            return
        payload = (
            dict(notify)
            if notify is not None
            else {**({"round": rnd} if rnd is not None else {}), **({"device": device} if device is not None else {}), **fields}
        )
        for listener in self.listeners:
            try:
                listener(event, dict(payload))
            except Exception:
                log.exception("%s", kv(event="on_event_failed", name=event))

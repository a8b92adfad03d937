"""The hand-off from the MQTT network thread to the round engine's thread.

    inbox = Inbox(max_bytes=64 << 20)
    inbox.put("message", topic, payload)      # network thread: blocks while over max_bytes
    inbox.put_control("durable", "", b"", 7)  # any thread, never blocks (the engine's own events)
    for event in inbox.take(timeout=0.5, limit=256): ...   # engine thread: a batch, or []

Why not queue.Queue: the engine handled one event per get(), two lock round trips per update
between two threads that also fight over the GIL; `take` moves a whole batch per lock round
trip. Why bounded by bytes: a fleet's updates arrive faster than they can be folded in during a
burst, and an unbounded backlog holds every frame in memory (for a 1.66M-parameter model 6.6 MB
each). While the backlog is over `max_bytes`, the network thread waits in `put`, paho stops
reading the socket, and the broker queues the rest (mosquitto's max_queued_messages), so memory
grows with the model, not with the fleet. Control events (connects, finished durable writes) are
never held back (the engine posts some itself and must never wait on its own inbox) and jump
the queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import NamedTuple


class Event(NamedTuple):
    kind: str  # "message", "connected", "durable"
    topic: str = ""
    payload: bytes = b""
    seq: int = 0  # "durable": the write's sequence number


class Inbox:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: deque[Event] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False

    def put(self, kind: str, topic: str, payload: bytes) -> None:
        """Queue a message; waits (network thread) while the backlog is over max_bytes, unless
        the backlog is empty (one frame larger than the bound still goes through)."""
        with self._lock:
            while self._bytes > 0 and self._bytes + len(payload) > self.max_bytes and not self._closed:
                self._not_full.wait(0.5)
            self._items.append(Event(kind, topic, payload))
            self._bytes += len(payload)
            self._not_empty.notify()

    def put_control(self, kind: str, topic: str = "", payload: bytes = b"", seq: int = 0) -> None:
        """Queue a control event ahead of the messages waiting: a finished durable write releases
        acks (and the memory they hold), which must not wait behind a backlog of updates."""
        with self._lock:
            self._items.appendleft(Event(kind, topic, payload, seq))
            self._bytes += len(payload)
            self._not_empty.notify()

    def take(self, timeout: float, limit: int) -> list[Event]:
        """Up to `limit` events in arrival order, waiting up to `timeout` seconds for the first."""
        with self._lock:
            if not self._items and timeout > 0:
                end = time.monotonic() + timeout
                while not self._items:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._not_empty.wait(left)
            n = min(limit, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            if n:
                self._bytes -= sum(len(e.payload) for e in out)
                self._not_full.notify_all()
            return out

    def empty(self) -> bool:
        return not self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def backlog_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        """Stop holding the network thread back (the engine is going away)."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()

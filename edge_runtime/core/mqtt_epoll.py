"""Many MQTT connections in one thread: paho's external-loop API driven by one epoll.

Why: paho's own loop (`loop()`, `loop_start()`) waits in select(), which cannot watch a file
descriptor >= 1024, so one process cannot hold 1,000 device connections with it. paho also
offers an external-loop API: it tells us when its socket opens, closes and wants to write
(`on_socket_open/close/register_write/unregister_write`), and we call `loop_read`,
`loop_write` and `loop_misc` when epoll says so. Everything else (packet handling, QoS 1
retries, keepalive) stays paho's, so a swarm device speaks exactly the MQTT a lone device
speaks. Why not an asyncio MQTT client (aiomqtt, gmqtt): the device code path would then run on
a second MQTT implementation with its own session and retry semantics; here it is the same
paho client class, and MqttLink's publish tracking and retained-topic memory are reused as is.

`EpollLink` is an MqttLink whose network work is done by an `EpollLoop` instead of a thread:
same public interface (subscribe, publish, flush, stop, connected...), same reconnect backoff
with jitter, same callbacks, all called from the loop's thread. Not thread-safe: everything
that touches a link runs on the loop's thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import resource
import select
import socket
import ssl
import time
from collections.abc import Callable

from paho.mqtt.enums import MQTTErrorCode

from fleetlearn.edge_runtime.core.mqtt import MqttLink, backoff_delay

log = logging.getLogger("fleetlearn.mqtt")

MISC_INTERVAL_S = 1.0  # how often every client's loop_misc runs (keepalive pings, timeouts)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns (soft, hard) afterwards.
    A paho client on this loop holds one descriptor (its socket: paho makes its wake-up socket
    pair only for its own loop) and each device a state-dir lock: 2 per device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class EpollLoop:
    """One epoll over many paho clients, plus a timer heap (reconnects, periodic work)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self._by_fd: dict[int, EpollLink] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.links: list[EpollLink] = []
        self._next_misc = time.monotonic() + MISC_INTERVAL_S

    def add(self, link: EpollLink) -> None:
        self.links.append(link)
        self.call_later(0.0, link._connect)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    # -------------------------------------------------------- socket callbacks from paho

    def _register(self, link: EpollLink, sock) -> None:
        fd = sock.fileno()
        self._by_fd[fd] = link
        try:
            self.epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self.epoll.modify(fd, select.EPOLLIN)

    def _want_write(self, sock, on: bool) -> None:
        fd = sock.fileno()
        if fd in self._by_fd:
            self.epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT if on else select.EPOLLIN)

    def _unregister(self, sock) -> None:
        fd = sock.fileno()
        if self._by_fd.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    # -------------------------------------------------------- the loop

    def run_once(self, timeout: float) -> None:
        """Wait up to `timeout` for socket events or a timer, and handle them."""
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        for fd, mask in self.epoll.poll(timeout, 512):
            link = self._by_fd.get(fd)
            if link is None:
                continue
            if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                link._read()
            if mask & select.EPOLLOUT and fd in self._by_fd:
                link._io(link.client.loop_write)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()
        if now >= self._next_misc:
            self._next_misc = now + MISC_INTERVAL_S
            for link in self.links:
                if link._sock_open:
                    link._io(link.client.loop_misc)

    def drain(self, timeout: float) -> None:
        """Serve the sockets until every link's clean DISCONNECT went out (or `timeout`), then close."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(link._sock_open for link in self.links):
            self.run_once(0.05)
        self.close()

    def close(self) -> None:
        self.epoll.close()


class EpollLink(MqttLink):
    """An MqttLink served by an EpollLoop (no thread of its own). Construct it, then `start()`."""

    def __init__(self, *args, loop: EpollLoop, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop = loop
        self._attempt = 0
        self._first = True
        self._sock_open = False
        c = self.client
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_socket_register_write = lambda client, userdata, sock: loop._want_write(sock, True)
        c.on_socket_unregister_write = lambda client, userdata, sock: loop._want_write(sock, False)

    def _socket_open(self, client, userdata, sock) -> None:
        self._sock_open = True
        if hasattr(sock, "setsockopt"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop._register(self, sock)

    def _socket_close(self, client, userdata, sock) -> None:
        self._sock_open = False
        self.loop._unregister(sock)

    def start(self) -> EpollLink:
        self.loop.add(self)
        return self

    def _connect(self) -> None:
        if self._stop.is_set():
            return
        try:
            if self._will_provider is not None:
                topic, payload, qos, retain = self._will_provider()
                self.client.will_set(topic, payload, qos=qos, retain=retain)
            if self._first:
                self.client.connect(self.broker.host, self.broker.port, keepalive=self.opts.keepalive, **self._connect_kwargs())
            else:
                self.client.reconnect()
            self._first = False
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"cannot connect to {self.broker.host}:{self.broker.port}: {exc}"
            self._retry_later(str(exc))

    def _retry_later(self, why: str) -> None:
        delay = backoff_delay(self._attempt, self.opts.backoff_min, self.opts.backoff_max, self._rng)
        log.info("event=mqtt_connect_failed client=%s error=%r retry_in=%.2fs", self.opts.client_id, why[:120], delay)
        self._attempt += 1
        self.loop.call_later(delay, self._connect)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish and write it at once: the caller is the loop's thread (the only one
        touching this link), so the message leaves now, not at the next poll after whatever the
        caller does next (a device's bookkeeping after sending its update). What the socket does
        not take now (a full send buffer) goes out when epoll says it is writable."""
        ok = super().publish(topic, payload, qos=qos, retain=retain)
        if self._sock_open and self.client.want_write():
            self._io(self.client.loop_write)
        return ok

    def _read(self) -> None:
        """Read what the socket has. A TLS socket may hold decrypted bytes that epoll cannot see
        (the kernel buffer is empty): read on while it has some, as paho's own loop does."""
        self._io(self.client.loop_read)
        left = -1
        while self._sock_open:
            pending = getattr(self.client.socket(), "pending", None)
            before, left = left, pending() if pending is not None else 0
            if left <= 0 or left == before:  # nothing buffered, or no progress: epoll's turn
                return
            self._io(self.client.loop_read)

    def _io(self, op: Callable[[], MQTTErrorCode]) -> None:
        try:
            rc = op()
        except (OSError, ssl.SSLError) as exc:
            rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            self.last_error = str(exc)
        if rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            if self.connected.is_set():
                self._attempt = 0
            return
        # The connection is gone (paho closed the socket and called on_disconnect, or will now).
        if self._sock_open:
            sock = self.client.socket()
            if sock is not None:
                self.loop._unregister(sock)
            self._sock_open = False
        self._mark_disconnected("connection lost")
        if not self._stop.is_set():
            self._retry_later(f"connection lost (rc={rc})")

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will); the caller keeps running the loop to flush it."""
        self._stop.set()
        try:
            self.client.disconnect()
        except Exception:  # already gone
            pass

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a killed device would: the broker then
        publishes our Last Will. For fault tests and the swarm's kill switch."""
        self._stop.set()
        sock = self.client.socket()
        if sock is not None:
            self.loop._unregister(sock)
            try:
                sock.close()
            except OSError:
                pass
        self._sock_open = False
        self.connected.clear()

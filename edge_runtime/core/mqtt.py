"""One MQTT connection that stays up: reconnects with exponential backoff and jitter.

Shared by the device agent, the aggregator and the monitor. Callbacks are thin: a message is
handed to `on_message(topic, payload)` from the network thread and the owner queues it; all
protocol state lives with the owner, never here.

Publishing: `publish()` tracks every QoS 1 message until the broker's PUBACK, so `flush()` can
wait for all of them (through paho's on_publish callback, never its private fields), and
remembers the last payload of every retained topic, so `republish_retained()` can put them back
after a broker that lost them (a restart without persistence) comes back.

Why not paho's own `loop_start()` reconnects: they back off without jitter, so a fleet that
lost its broker reconnects in lockstep. Why TCP_NODELAY: without it, Nagle's algorithm plus
delayed ACKs add about 40 ms to every round trip of small messages (measured here).
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fleetlearn.edge_runtime.core.errors import ConfigError

log = logging.getLogger("fleetlearn.mqtt")


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has a bad port") from None
        return cls(parts.hostname, port, parts.scheme == "mqtts")


@dataclass(frozen=True)
class LinkOptions:
    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_hostname: bool = False
    protocol: str = "3.1.1"  # "5" where the broker has it (a denied publish is then reported)
    keepalive: int = 30
    clean_session: bool = False  # persistent session, though correctness never relies on it
    will: tuple[str, bytes, int, bool] | None = None  # topic, payload, qos, retain
    backoff_min: float = 0.5
    backoff_max: float = 30.0


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half the capped exponential, plus a random half."""
    cap = min(hi, lo * (2**attempt))
    return cap / 2 + rng.uniform(0, cap / 2)


class MqttLink:
    def __init__(
        self,
        opts: LinkOptions,
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        will_provider: Callable[[], tuple[str, bytes, int, bool]] | None = None,
    ):
        self.opts = opts
        self.broker = BrokerURL.parse(opts.url)
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        # Builds the Last Will afresh before each connect, so it says what is true now (e.g. the
        # device's last round), not what was true when the process started.
        self._will_provider = will_provider
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.last_error = ""
        self.bytes_out = 0
        self.bytes_in = 0
        self._rng = random.Random()
        self._unacked: dict[int, str] = {}  # mid -> topic of QoS 1 publishes not yet PUBACKed
        # PUBACKs (and QoS 0 sends) seen before publish() recorded the mid: paho may call
        # on_publish before client.publish() returns. Mids are sequential and wrap at 65535, so
        # keeping the last 4096 can never confuse a stale entry with a reused mid.
        self._acked_early: dict[int, None] = {}
        self._retained: dict[str, tuple[bytes, int]] = {}  # topic -> (payload, qos), for republish_retained()
        self._thread: threading.Thread | None = None
        self.client = self._make_client()

    def _make_client(self) -> paho.Client:
        o = self.opts
        v5 = o.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else o.clean_session,
        )
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if self.broker.tls:
            client.tls_set(ca_certs=o.ca_file, certfile=o.cert_file, keyfile=o.key_file, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(o.insecure_skip_hostname)
        if o.will:
            topic, payload, qos, retain = o.will
            client.will_set(topic, payload, qos=qos, retain=retain)
        # Queue QoS 1 messages while disconnected and keep many in flight: a round is a burst.
        client.max_inflight_messages_set(100)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        # Only the network thread touches the socket. Without a register-write hook, paho writes a
        # publish() made on another thread (the owner's) straight to the socket while the network
        # thread may be reading it: an SSL object used by two threads at once corrupts the TLS
        # stream ("bad record mac", seen with the aggregator's lease connection). With the hook,
        # publish() only queues and wakes the loop's select() through paho's socket pair.
        client.on_socket_register_write = lambda *_: None
        return client

    def _connect_kwargs(self) -> dict:
        """MQTT 5 ends a session at disconnect unless told otherwise: ask for a week, like a
        3.1.1 persistent session, so a restarting peer does not lose what was sent meanwhile."""
        if self.opts.protocol != "5":
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        if not self.opts.clean_session:
            props.SessionExpiryInterval = 7 * 24 * 3600
        return {"clean_start": self.opts.clean_session, "properties": props}

    # ------------------------------------------------------------ paho callbacks (thin)

    def _handle_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("event=mqtt_refused client=%s reason=%r", self.opts.client_id, str(reason_code))
            return
        with self._lock:
            subs = list(self._subs.items())
        # Subscribe again on every connect: we never rely on the broker keeping our session.
        if subs:
            client.subscribe([(t, q) for t, q in subs])
        self.connected.set()
        self.last_error = ""
        log.info("event=mqtt_connected client=%s broker=%s:%d", self.opts.client_id, self.broker.host, self.broker.port)
        if self._on_connect_cb:
            self._on_connect_cb()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._mark_disconnected(str(reason_code))

    def _mark_disconnected(self, reason: str) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stop.is_set():
            log.warning("event=mqtt_disconnected client=%s reason=%r", self.opts.client_id, reason)
            if self._on_disconnect_cb:
                self._on_disconnect_cb(reason)

    def _handle_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        # Over MQTT 5 a broker reports a denied publish (e.g. 0x87 not authorized) in its PUBACK;
        # over 3.1.1 it cannot, which is why delivery also needs end-to-end acknowledgements.
        with self._lock:
            topic = self._unacked.pop(mid, None)
            if topic is None:
                self._acked_early[mid] = None
                if len(self._acked_early) > 4096:
                    del self._acked_early[next(iter(self._acked_early))]
        topic = topic or "?"
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            log.warning("event=mqtt_publish_refused client=%s topic=%s reason=%r", self.opts.client_id, topic, str(reason_code))

    def _handle_message(self, client, userdata, msg) -> None:
        self.bytes_in += len(msg.payload)
        self._on_message(msg.topic, msg.payload)

    # ------------------------------------------------------------ public

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic] = qos
        if self.connected.is_set():
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        if self.connected.is_set():
            self.client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish. QoS 1 messages published while offline are sent after reconnect and
        tracked until acknowledged (`flush`); a retained one is remembered (an empty payload
        clears the topic and forgets it) for `republish_retained`."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        queued = info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
        with self._lock:
            if qos and queued:
                if info.mid in self._acked_early:
                    del self._acked_early[info.mid]
                else:
                    self._unacked[info.mid] = topic
            if retain:
                if payload:
                    self._retained[topic] = (bytes(payload), qos)
                else:
                    self._retained.pop(topic, None)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self.bytes_out += len(payload)
            return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        log.warning("event=mqtt_publish_failed client=%s topic=%s rc=%s", self.opts.client_id, topic, info.rc)
        return False

    def unacknowledged(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker."""
        with self._lock:
            return len(self._unacked)

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 message published so far."""
        end = time.monotonic() + timeout
        while self.unacknowledged():
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)
        return True

    def republish_retained(self) -> int:
        """Publish again the last payload of every retained topic (after a reconnect to a broker
        that may have lost them); returns how many."""
        with self._lock:
            retained = list(self._retained.items())
        for topic, (payload, qos) in retained:
            self.publish(topic, payload, qos=qos, retain=True)
        return len(retained)

    def start(self) -> MqttLink:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.opts.client_id}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) after flushing what is queued, then end the thread."""
        deadline = time.monotonic() + timeout
        while self.connected.is_set() and self.client.want_write() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        try:
            # The network thread has ended: write the DISCONNECT from here (publish and disconnect
            # only queue, see _make_client), so the broker does not publish our Last Will.
            self.client.disconnect()
            self.client.loop_write()
        except Exception:  # already gone: nothing to flush
            pass

    # ------------------------------------------------------------ network thread

    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                if self._will_provider is not None:
                    topic, payload, qos, retain = self._will_provider()
                    self.client.will_set(topic, payload, qos=qos, retain=retain)
                if first:
                    self.client.connect(
                        self.broker.host, self.broker.port, keepalive=self.opts.keepalive, **self._connect_kwargs()
                    )
                else:
                    self.client.reconnect()
                first = False
                sock = self.client.socket()
                if sock is not None and (isinstance(sock, socket.socket) or hasattr(sock, "setsockopt")):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, ssl.SSLError, ValueError) as exc:
                first = first and isinstance(exc, ValueError)
                self.last_error = f"cannot connect to {self.broker.host}:{self.broker.port}: {exc}"
                delay = backoff_delay(attempt, self.opts.backoff_min, self.opts.backoff_max, self._rng)
                log.info(
                    "event=mqtt_connect_failed client=%s error=%r retry_in=%.2fs", self.opts.client_id, str(exc)[:120], delay
                )
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            self._mark_disconnected("connection lost")
            if self._stop.is_set():
                break
            # A connection that lived a while resets the backoff; a refused one keeps growing.
            attempt = attempt + 1 if self.last_error else 0
            delay = backoff_delay(attempt, self.opts.backoff_min, self.opts.backoff_max, self._rng)
            self._stop.wait(delay)

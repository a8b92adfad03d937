"""A local MQTT broker with zero setup: Debian's mosquitto when installed, else amqtt embedded.

`fleetlearn broker [--host 127.0.0.1] [--port 1883] [--embedded]` serves until SIGINT or SIGTERM
and then exits 0. It runs mosquitto (aggregator/broker_mosquitto.py: a child process with a
generated minimal config) when the binary is installed, and the embedded amqtt broker otherwise
or with --embedded; its first log line says which. `EmbeddedBroker(host, port).start()` runs
amqtt in a background thread with its own asyncio loop; `start_local_broker()` picks one the
same way for a Python program (the demo).

amqtt runs as `aggregator/amqtt_fixes.py`'s subclass, which fixes its retained-message delivery
(0.12.1 sends a connecting client the retained messages of everybody's subscriptions); see
docs/operations.md for what upstream should fix.

What amqtt 0.12.1 is, measured here, and what follows:
  * it speaks MQTT 3.1.1 only: clients must not ask for MQTT 5 (MqttLink's default is 3.1.1);
  * it refuses every client unless an authentication plugin says yes, so we configure
    `AnonymousAuthPlugin` with `allow_anonymous: true` explicitly (anyone on the listening
    interface can connect: bind it to 127.0.0.1 unless the fleet's network is trusted; use
    mosquitto with `fleetlearn broker-config` for a real deployment);
  * it keeps no offline queue for anonymous persistent sessions: a device that was offline
    gets the *retained* global model and round state on reconnect, never the messages it
    missed. The protocol never relies on offline queues, so this is enough;
  * it has no message size limit of its own (MQTT's 256 MB remaining length is the bound),
    so 256 KiB bundle chunks and multi-megabyte global models pass;
  * retained messages live in memory only: a restarted broker has none, which is why the
    aggregator republishes its retained state on every reconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from typing import Any

log = logging.getLogger("fleetlearn.broker")

ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12.1's configuration: one TCP listener, anonymous clients allowed, nothing else.

    `plugins` is given explicitly so amqtt loads only the anonymous-auth plugin (its defaults
    would also add packet loggers and a $SYS publisher we do not want).
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {ANONYMOUS_PLUGIN: {"allow_anonymous": True}},
    }


class _ProbeFilter(logging.Filter):
    """amqtt logs a TCP connect that sends nothing (a port probe, a health check) as an ERROR
    plus a WARNING; that is not an error of the broker, so it is dropped below debug level."""

    NOISE = ("No data to decode MQTT packet fixed header",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def _quiet_amqtt(level: int) -> None:
    # amqtt logs every connection at INFO; at our default level only its warnings matter.
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        logger.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if level > logging.DEBUG:
        logger = logging.getLogger("amqtt.broker")
        if not any(isinstance(f, _ProbeFilter) for f in logger.filters):
            logger.addFilter(_ProbeFilter())


def _bound_port(broker: Any, fallback: int) -> int:
    """The port the listener really bound (differs from the request when it asked for 0)."""
    try:
        server = broker._servers["default"]
        return int(server.instance.sockets[0].getsockname()[1])
    except (AttributeError, KeyError, IndexError, TypeError):
        return fallback


class EmbeddedBroker:
    """An amqtt broker served from a daemon thread with its own event loop.

        broker = EmbeddedBroker("127.0.0.1", 0).start()   # port 0: pick a free port
        ... broker.url ...                               # mqtt://127.0.0.1:<port>
        broker.stop()

    Also a context manager. `start()` raises RuntimeError with the reason when the broker
    cannot start (for example the port is taken).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    name = "amqtt"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def describe(self) -> str:
        from fleetlearn.aggregator.amqtt_fixes import AMQTT_VERSION

        return f"embedded amqtt {AMQTT_VERSION} (in this process)"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if self._thread is not None:
            raise RuntimeError("broker already started")
        self._thread = threading.Thread(target=self._thread_main, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"embedded broker did not start within {timeout:.0f}s")
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"embedded broker cannot listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if self._stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop_event.set)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            # asyncio.run also cancels whatever amqtt left running and closes the loop.
            asyncio.run(self._serve())
        except BaseException as exc:  # reported through start()
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            _quiet_amqtt(logging.getLogger().getEffectiveLevel())
        self._stop_event = asyncio.Event()
        broker = await start_broker(self.host, self.port)
        self.port = _bound_port(broker, self.port)
        self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await stop_broker(broker)


async def start_broker(host: str, port: int) -> Any:
    """Create and start an amqtt broker on the running loop; raises with amqtt's reason."""
    from fleetlearn.aggregator.amqtt_fixes import fixed_broker_class

    broker = fixed_broker_class()(broker_config(host, port))
    await broker.start()
    log.info("event=broker_started broker=amqtt host=%s port=%d", host, _bound_port(broker, port))
    return broker


async def stop_broker(broker: Any, timeout: float = 3.0) -> None:
    """amqtt's shutdown, made reliable. Measured here: amqtt 0.12.1's shutdown hung about one
    time in eight (5 of 40) when a client had disconnected just before: the broker cancels that
    client's reader task while the task is closing the connection, then waits forever for the
    task to report that it stopped. Waiting 0.2 s first lets closing connections finish (0
    hangs in 80 tries); should it still hang, after `timeout` we close the listeners ourselves
    and the caller's asyncio.run cancels the stuck tasks."""
    # Let connections that are closing right now finish closing (the race described above).
    await asyncio.sleep(0.2)
    try:
        await asyncio.wait_for(broker.shutdown(), timeout)
        return
    except TimeoutError:
        log.warning("event=broker_shutdown_forced reason=%r", f"amqtt shutdown did not finish in {timeout:g}s")
    except Exception as exc:
        log.warning("event=broker_shutdown_forced reason=%r", f"{type(exc).__name__}: {exc}"[:200])
    # What is cancelled from here on is expected to be: keep it out of the error log.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    loop = asyncio.get_running_loop()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    for server in list(getattr(broker, "_servers", {}).values()):
        instance = getattr(server, "instance", None)
        if instance is not None:
            instance.close()


def start_local_broker(host: str, port: int, embedded: bool = False) -> Any:
    """mosquitto when installed (and not `embedded`), else amqtt in a thread; started. Both have
    `.url`, `.name`, `.describe()` and `.stop()`. Raises RuntimeError with the reason."""
    from fleetlearn.aggregator.broker_mosquitto import MosquittoBroker, mosquitto_path

    if not embedded and mosquitto_path():
        return MosquittoBroker(host, port).start()
    return EmbeddedBroker(host, port).start()


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for a LAN fleet)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    parser.add_argument("--embedded", action="store_true", help="run the embedded amqtt broker even when mosquitto is installed")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


async def _serve_until_signal(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker = await start_broker(host, port)
    try:
        await stop.wait()
    finally:
        log.info("event=broker_stopping")
        await stop_broker(broker)
    log.info("event=broker_stopped")


def run(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator.logs import setup_logging
    from fleetlearn.edge_runtime.core.errors import UsageError

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port")
    level = setup_logging(args.log_level)
    from fleetlearn.aggregator.broker_mosquitto import mosquitto_path

    if not args.embedded and mosquitto_path():
        return _run_mosquitto(args.host, args.port)
    _quiet_amqtt(level)
    try:
        asyncio.run(_serve_until_signal(args.host, args.port))
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        raise UsageError(f"cannot run the broker on {args.host}:{args.port}: {exc}") from None
    return 0


def _run_mosquitto(host: str, port: int) -> int:
    """mosquitto as our child until SIGINT/SIGTERM; 0 then, 1 when mosquitto dies on its own."""
    from fleetlearn.aggregator.broker_mosquitto import MosquittoBroker
    from fleetlearn.edge_runtime.core.errors import UsageError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        broker = MosquittoBroker(host, port).start()
    except RuntimeError as exc:
        raise UsageError(f"cannot run the broker on {host}:{port}: {exc} (mosquitto)") from None
    log.info(
        "event=broker_started broker=mosquitto version=%s host=%s port=%d binary=%s",
        broker.version,
        host,
        broker.port,
        broker.binary,
    )
    try:
        while not stop.wait(0.5):
            if broker.returncode() is not None:
                log.error("event=broker_died broker=mosquitto code=%s", broker.returncode())
                return 1
    finally:
        log.info("event=broker_stopping")
        broker.stop()
    log.info("event=broker_stopped")
    return 0

"""Debian's mosquitto as fleetlearn's local broker: a subprocess with a generated minimal config.

`fleetlearn broker` and `fleetlearn demo` prefer it when it is installed (mosquitto is the
reference MQTT broker; the embedded amqtt one is the zero-install fallback, see
aggregator/broker.py). The config it writes is the least that serves a local fleet:

    listener PORT HOST          one TCP listener, on loopback unless --host says otherwise
    allow_anonymous true        like the embedded broker; `fleetlearn broker-config` secures a real fleet
    set_tcp_nodelay true        small acks and status messages leave at once (no Nagle delay)
    persistence false           retained state lives in the aggregator, which republishes it
    max_queued_messages 10000   room for a fleet's updates while a subscriber is busy
    log_type ...information     mosquitto's "running" line is how we know the listener is bound

`MosquittoBroker` has EmbeddedBroker's shape (start/stop/url/port, context manager), so the demo
and `fleetlearn broker` treat both alike.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("fleetlearn.broker")

SBIN = Path("/usr/sbin/mosquitto")  # Debian installs it outside a user's PATH


def mosquitto_path() -> str | None:
    """The mosquitto binary, or None when it is not installed. FLEETLEARN_MOSQUITTO overrides:
    a path to the binary, or `none` to act as if it were not installed (tests, odd setups)."""
    override = os.environ.get("FLEETLEARN_MOSQUITTO")
    if override is not None:
        return None if override.strip().lower() in ("", "none") else override
    found = shutil.which("mosquitto")
    if found:
        return found
    return str(SBIN) if SBIN.is_file() else None


def mosquitto_conf(host: str, port: int) -> str:
    return (
        f"listener {port} {host}\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
        "max_queued_messages 10000\nlog_dest stderr\nlog_timestamp false\n"
        "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """mosquitto in a child process:

        broker = MosquittoBroker("127.0.0.1", 0).start()   # port 0: a free port
        ... broker.url ...
        broker.stop()

    `start()` returns once mosquitto says it is running, or raises RuntimeError with
    mosquitto's own error line (e.g. "Address already in use").
    """

    name = "mosquitto"

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, binary: str | None = None):
        self.host = host
        self.port = port
        self.binary = binary or mosquitto_path()
        self.proc: subprocess.Popen | None = None
        self.version = ""
        self._dir: tempfile.TemporaryDirectory | None = None
        self._running = threading.Event()  # set on the "running" line, or when the log ends
        self._ready = False  # mosquitto said it is running
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def describe(self) -> str:
        return f"mosquitto {self.version or '(unknown version)'} ({self.binary})"

    def start(self, timeout: float = 15.0) -> MosquittoBroker:
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto), use the embedded broker")
        if self.proc is not None:
            raise RuntimeError("broker already started")
        if self.port == 0:
            self.port = _free_port(self.host)
        self._dir = tempfile.TemporaryDirectory(prefix="fleetlearn-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(mosquitto_conf(self.host, self.port))
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(target=self._read_log, name="mosquitto-log", daemon=True)
        self._reader.start()
        self._running.wait(timeout)
        if not self._ready or self.proc.poll() is not None:
            errors = (
                [ln for ln in self._lines if ln.lower().startswith("error")]
                or self._lines[-1:]
                or [f"not running after {timeout:g}s"]
            )
            self.stop()
            raise RuntimeError(errors[-1][:300])
        return self

    def _read_log(self) -> None:
        """Drain mosquitto's stderr (a full pipe would stall it); notice when it is listening."""
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            self._lines = (self._lines + [line])[-20:]
            if line.startswith("mosquitto version ") and line.endswith(" running"):
                self.version = line.split()[2]
                self._ready = True
                self._running.set()
            elif line.lower().startswith(("error", "warning")):
                log.warning("event=mosquitto_log line=%r", line[:300])
            else:
                log.debug("event=mosquitto_log line=%r", line[:300])
        self._running.set()  # exited: wake start() so it reports the reason

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if self._reader is not None:
                self._reader.join(2)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

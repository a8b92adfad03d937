"""`fleetlearn monitor --json` as a real process against a real mosquitto.

The rounds are driven by a scripted publisher (a paho client publishing valid protocol
messages); a device is a separate process holding a Last Will on its status topic, killed
with SIGKILL so the broker publishes the will. Nothing is mocked.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleetlearn.edge_runtime.core.protocol import RoundState, Status, Topics, Update, encode_json
from tests.conftest import ROOT, stop_process

PY = sys.executable
RUN = "0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.mosquitto


class MonitorProcess:
    """`fleetlearn monitor --json` in a subprocess; its stdout lines parsed on a thread."""

    def __init__(self, broker_url: str, fleet: str, workdir: Path, *extra: str):
        self.stderr_path = workdir / f"monitor-{fleet}.stderr"
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "fleetlearn.cli",
                "monitor",
                "--broker",
                broker_url,
                "--fleet",
                fleet,
                "--json",
                "--log-level",
                "info",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.stderr_path, "wb"),
            cwd=ROOT,
        )
        self.events: list[dict[str, Any]] = []
        self._returned: set[int] = set()  # indices into events already handed to a caller
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))  # a non-JSON line fails the test in wait_for

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0, what: str = "") -> dict[str, Any]:
        """The first event not returned before that matches `pred` (already read or still to
        come: two topics' messages may arrive in either order); fails with what was seen."""
        for i, event in enumerate(self.events):
            if i not in self._returned and pred(event):
                self._returned.add(i)
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.events.append(event)
            if pred(event):
                self._returned.add(len(self.events) - 1)
                return event
        seen = "\n".join(json.dumps(e) for e in self.events[-30:])
        pytest.fail(
            f"monitor never reported {what or 'the expected event'} within {timeout}s; last events:\n{seen}\nstderr:\n{self.stderr_path.read_text()[-2000:]}"
        )

    def stop(self) -> int:
        return stop_process(self.proc, signal.SIGTERM)


class Publisher:
    """The test's stand-in for the aggregator: a plain paho client publishing protocol messages."""

    def __init__(self, broker_url: str, fleet: str):
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.topics = Topics(fleet)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{time.monotonic_ns()}")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def round(self, round_: int, state: str, accepted: int = 0, total: int = 5) -> None:
        rs = RoundState(
            RUN, round_, state, total_rounds=total, deadline=time.time() + 30, min_devices=1, target_devices=2, accepted=accepted
        )
        self.publish(self.topics.round, rs.encode(), retain=True)

    def metrics(self, round_: int, devices: list[str], test_mse: float) -> None:
        doc = {
            "round": round_,
            "run_id": RUN,
            "devices": devices,
            "samples": 100 * len(devices),
            "train_loss": test_mse * 1.1,
            "test_mse": test_mse,
            "wall_s": 0.5,
            "bytes_in": 1000,
            "bytes_out": 2000,
            "rejected": 0,
            "deadline_extensions": 0,
        }
        self.publish(self.topics.metrics, encode_json(doc), retain=True)

    def upload(self, device: str, round_: int) -> None:
        up = Update(RUN, round_, device, "c" * 64, 100, 1.0, 0.1, "e" * 32, np.zeros(8, np.float32))
        self.publish(self.topics.update(device), up.encode())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# A device stand-in: connects with a Last Will "offline" on its retained status, says "idle",
# and sleeps until killed. The will is what the monitor must surface.
DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from fleetlearn.edge_runtime.core.mqtt import LinkOptions, MqttLink
    from fleetlearn.edge_runtime.core.protocol import Status, Topics
    url, fleet, dev = sys.argv[1:4]
    topic = Topics(fleet).status(dev)
    will = Status(dev, "offline", 0, "connection lost (last will)", 0.0).encode()
    link = MqttLink(LinkOptions(url=url, client_id="test-device-" + dev, keepalive=5, clean_session=True, will=(topic, will, 1, True)), on_message=lambda t, p: None)
    link.start()
    if not link.wait_connected(10):
        sys.exit(3)
    link.publish(topic, Status(dev, "idle", 0, "", time.time()).encode(), qos=1, retain=True)
    while True:
        time.sleep(1)
    """
)


def start_device(broker_url: str, fleet: str, device: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", DEVICE_SCRIPT, broker_url, fleet, device], cwd=ROOT)


def is_(event: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())


def test_monitor_follows_rounds_and_sees_a_killed_device_go_offline(mosquitto, tmp_path):
    fleet = "mon1"
    pub = Publisher(mosquitto.url, fleet)
    # Retained state from before the monitor starts: it must pick this up on connect.
    pub.round(1, "open")
    monitor = MonitorProcess(mosquitto.url, fleet, tmp_path)
    device = start_device(mosquitto.url, fleet, "dev-2")
    try:
        monitor.wait_for(is_("connected"), what="connected")
        monitor.wait_for(is_("round", round=1, state="open"), what="the retained open round 1")
        monitor.wait_for(is_("device", device_id="dev-2", state="idle"), what="dev-2 idle")

        pub.publish(pub.topics.status("dev-1"), Status("dev-1", "training", 1, "", time.time()).encode(), retain=True)
        pub.upload("dev-1", 1)
        up = monitor.wait_for(is_("upload", device_id="dev-1", round=1), what="dev-1's upload")
        assert up["late"] is False
        pub.round(1, "closed", accepted=1)
        monitor.wait_for(is_("round", round=1, state="closed"), what="round 1 closed")
        # dev-2 was online and never uploaded: late for round 1.
        late = monitor.wait_for(is_("late", round=1), what="a late device")
        assert late["device_id"] == "dev-2" and late["late"] is True
        pub.metrics(1, ["dev-1"], 30.0)
        m = monitor.wait_for(is_("metrics", round=1), what="round 1 metrics")
        assert m["devices"] == ["dev-1"] and m["test_mse"] == 30.0 and m["samples"] == 100

        pub.round(2, "open")
        monitor.wait_for(is_("round", round=2, state="open"), what="round 2 open")

        device.send_signal(signal.SIGKILL)  # no clean disconnect: the broker publishes the will
        device.wait(10)
        off = monitor.wait_for(is_("device", device_id="dev-2", state="offline"), timeout=20, what="dev-2 offline (last will)")
        assert off["previous"] == "idle" and "last will" in off["detail"]

        pub.upload("dev-1", 2)
        monitor.wait_for(is_("upload", device_id="dev-1", round=2), what="dev-1's round 2 upload")
        pub.round(2, "closed", accepted=1)
        pub.metrics(2, ["dev-1"], 20.0)
        monitor.wait_for(is_("metrics", round=2), what="round 2 metrics")
        # dev-1 uploaded in time and dev-2 is offline (not late): nobody is late in round 2.
        assert not any(e["event"] == "late" and e["round"] == 2 for e in monitor.events)
    finally:
        stop_process(device, signal.SIGKILL)
        rc = monitor.stop()
        pub.close()
    assert rc == 0, "SIGTERM must end the monitor with exit status 0"
    rounds = [e["round"] for e in monitor.events if e["event"] == "round"]
    assert rounds == sorted(rounds) and rounds[-1] == 2
    assert all("ts" in e for e in monitor.events)


def test_monitor_survives_a_broker_restart(mosquitto, tmp_path):
    fleet = "mon2"
    pub = Publisher(mosquitto.url, fleet)
    pub.round(1, "open")
    monitor = MonitorProcess(mosquitto.url, fleet, tmp_path)
    try:
        monitor.wait_for(is_("connected"), what="connected")
        monitor.wait_for(is_("round", round=1, state="open"), what="round 1 open")
        pub.close()

        mosquitto.restart(down_s=1.5)  # persistence is off: the retained state is gone too
        monitor.wait_for(is_("disconnected"), timeout=10, what="disconnected")
        monitor.wait_for(is_("connected"), timeout=20, what="connected again after the restart")

        pub = Publisher(mosquitto.url, fleet)  # the aggregator reconnects and republishes
        # Retained, and each awaited before the next overwrites it: the monitor's
        # subscriptions may still be in flight right after its "connected".
        pub.round(1, "closed", accepted=2)
        pub.metrics(1, ["a", "b"], 12.5)
        monitor.wait_for(is_("round", round=1, state="closed"), what="round 1 closed after the restart")
        monitor.wait_for(is_("metrics", round=1), what="metrics after the restart")
        pub.round(2, "open")
        monitor.wait_for(is_("round", round=2, state="open"), what="round 2 open after the restart")
    finally:
        rc = monitor.stop()
        pub.close()
    assert rc == 0


def test_monitor_ignores_garbage_and_keeps_going(mosquitto, tmp_path):
    fleet = "mon3"
    monitor = MonitorProcess(mosquitto.url, fleet, tmp_path)
    pub = Publisher(mosquitto.url, fleet)
    try:
        # A retained round arriving proves the subscriptions are active (one SUBSCRIBE for all
        # topics); the garbage below is not retained and would be lost before that.
        pub.round(3, "open")
        monitor.wait_for(is_("round", round=3), what="the retained round 3")
        t = pub.topics
        pub.publish(t.round, b"\xff\xfe not json")
        pub.publish(t.metrics, b'{"v":1,"round":"three"}')
        pub.publish(t.status("dev-x"), Status("dev-y", "idle").encode())  # names another device
        pub.publish(t.update("dev-x"), b"FLRN" + b"\x00" * 40)  # a broken frame
        pub.publish(t.global_model, b"\x00" * 10)
        pub.round(4, "open")
        monitor.wait_for(is_("round", round=4), what="a valid round after the garbage")
        ignored = [e for e in monitor.events if e["event"] == "ignored"]
        assert {e["topic"] for e in ignored} == {t.round, t.metrics, t.status("dev-x"), t.update("dev-x"), t.global_model}
        assert all(e["reason"] for e in ignored)
    finally:
        rc = monitor.stop()
        pub.close()
    assert rc == 0


def test_monitor_usage_errors_exit_2(tmp_path):
    for args in (
        ["--broker", "http://localhost"],
        ["--broker", "mqtt://127.0.0.1:1", "--fleet", "a/b"],
        ["--broker", "mqtt://127.0.0.1:1", "--password-file", str(tmp_path / "missing")],
    ):
        r = subprocess.run(
            [PY, "-m", "fleetlearn.cli", "monitor", "--json", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr


def test_live_view_in_a_terminal(mosquitto, tmp_path):
    """The rich view on a real pseudo-terminal: it draws the round and the device, and
    SIGINT (Ctrl-C) ends it with status 0."""
    import os
    import pty
    import re
    import select

    fleet = "mon4"
    pub = Publisher(mosquitto.url, fleet)
    pub.round(3, "open")
    pub.publish(pub.topics.status("pi-7"), Status("pi-7", "training", 3, "", time.time()).encode(), retain=True)
    pub.metrics(2, ["pi-7"], 42.0)
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the monitor, on the pty
        os.chdir(ROOT)
        os.environ.update(COLUMNS="140", LINES="40", TERM="xterm-256color")
        os.execv(PY, [PY, "-m", "fleetlearn.cli", "monitor", "--broker", mosquitto.url, "--fleet", fleet])
    screen = b""
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline and not all(s in text for s in ("round 3/5", "pi-7", "training", "42")):
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
        assert "round 3/5" in text and "pi-7" in text and "training" in text and "42" in text, text[-3000:]
        os.kill(pid, signal.SIGINT)
        end = time.monotonic() + 10
        status = None
        while status is None and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    os.read(fd, 65536)  # keep draining so the child never blocks on a full pty
                except OSError:
                    pass  # EIO: the child closed its side
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the live monitor did not exit after SIGINT")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        pub.close()

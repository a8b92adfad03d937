"""Shared fixtures: real brokers on loopback, a real exported bundle, free ports, processes.

Nothing here is mocked: the brokers are Debian's mosquitto and the embedded amqtt broker,
started as separate processes on free loopback ports.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Broker:
    """A running broker process: `url` to connect, `restart()` for fault tests."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{kind}-broker.log"

    def start(self) -> Broker:
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                "persistence false\nmax_queued_messages 10000\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            )
            cmd = [mosquitto_binary(), "-c", str(conf)]
        else:
            cmd = [PY, "-m", "fleetlearn.cli", "broker", "--embedded", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not path:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (the README's test command does)")
    return path


@pytest.fixture
def mosquitto(tmp_path):
    broker = Broker("mosquitto", tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def amqtt_broker(tmp_path):
    broker = Broker("amqtt", tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request, tmp_path):
    broker = Broker(request.param, tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def boston_split():
    import numpy as np

    with np.load(DATA / "boston_housing_split.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def boston_bundle(tmp_path_factory, boston_split):
    """The boston-mlp exported once per test session, standardised on the training split."""
    from fleetlearn.export import build_bundle, resolve_model

    model, _ = resolve_model("boston-mlp", seed=0)
    x = boston_split["x_train"]
    out = tmp_path_factory.mktemp("bundles") / "boston"
    build_bundle(
        model,
        out,
        model_name="boston-mlp",
        input_shape=(13,),
        loss="mse",
        optimizer="adamw",
        lr=1e-3,
        preprocessing={"mean": x.mean(0).tolist(), "std": x.std(0).tolist()},
        seed=0,
    )
    return out


@pytest.fixture(scope="session")
def boston_shards(tmp_path_factory, boston_split):
    """Three device shards of the Keras training split and the test split, as NPZ files."""
    import numpy as np

    d = tmp_path_factory.mktemp("data")
    x, y = boston_split["x_train"], boston_split["y_train"]
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(len(x)), 3)):
        p = d / f"shard{i}.npz"
        np.savez(p, x=x[idx], y=y[idx])
        paths.append(p)
    test = d / "test.npz"
    np.savez(test, x=boston_split["x_test"], y=boston_split["y_test"])
    return paths, test

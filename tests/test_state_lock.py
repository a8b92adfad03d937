"""One process per state dir: a second aggregator or device on a state dir in use exits 2 at
once with one line naming the holder's pid; a SIGKILLed holder leaves nothing that blocks a
restart. Real processes on a real broker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.procs import AggregatorProcess
from tests.test_device import start_device, write_config

FLEET = "locktest"


def wait_holder(state: Path, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (state / ".lock").read_text().strip() == str(pid):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took the lock on {state}")


def second(*args: str) -> subprocess.CompletedProcess:
    """A second `fleetlearn ARGS` process; it must give up at once (the timeout is a safety net)."""
    r = subprocess.run([sys.executable, "-m", "fleetlearn.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return r


def test_second_aggregator_on_a_state_dir_exits_2_naming_the_holder(mosquitto, tmp_path, boston_bundle):
    state = tmp_path / "agg"
    args = ("--rounds", "1", "--min-devices", "1", "--deadline", "600")
    first = AggregatorProcess(tmp_path, mosquitto.url, FLEET, state, *args, bundle=boston_bundle)
    try:
        wait_holder(state, first.proc.pid)
        r = second(
            "aggregator",
            "--broker",
            mosquitto.url,
            "--fleet",
            "other",
            "--state-dir",
            str(state),
            "--bundle",
            str(boston_bundle),
            *args,
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("fleetlearn aggregator: error: state dir") and f"(pid {first.proc.pid})" in lines[0]
        assert first.proc.poll() is None  # the holder runs on, untouched
        # A holder that dies without cleaning up (SIGKILL) leaves a lock file but no lock.
        first.kill9()
        again = AggregatorProcess(tmp_path, mosquitto.url, FLEET, state, *args, bundle=boston_bundle, name="again")
        try:
            wait_holder(state, again.proc.pid)
            assert again.proc.poll() is None
        finally:
            again.stop()
    finally:
        first.stop()


def test_second_device_on_a_state_dir_exits_2_naming_the_holder(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    state = tmp_path / "dev-0-state"
    first = start_device(cfg, tmp_path / "first.log")
    try:
        wait_holder(state, first.pid)
        r = second("device", "--config", str(cfg))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fleetlearn device: error: state dir"), r.stderr
        assert f"(pid {first.pid})" in lines[0]
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(15)
    # Released at exit: the next device process takes it.
    nxt = start_device(cfg, tmp_path / "next.log")
    try:
        wait_holder(state, nxt.pid)
    finally:
        nxt.terminate()
        nxt.wait(15)


def test_lock_is_per_process_and_released_on_close(tmp_path):
    from fleetlearn.edge_runtime.core.state_lock import StateDirLocked, lock_state_dir

    lock = lock_state_dir(tmp_path / "s", "test")
    # Another open file description in this same process conflicts too (flock semantics).
    with pytest.raises(StateDirLocked, match=r"pid \d+"):
        lock_state_dir(tmp_path / "s", "test")
    lock.release()
    lock_state_dir(tmp_path / "s", "test").release()

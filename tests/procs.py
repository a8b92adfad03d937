"""fleetlearn commands (the aggregator, a device) as real subprocesses for tests, each with its
stderr (key=value lines) in a log file."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, stop_process


class FleetlearnProcess:
    """`python -m fleetlearn.cli ARGS...` as a subprocess, its stderr in `log`."""

    what = "process"

    def __init__(self, log: Path, *args: str):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetlearn.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb")
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            pytest.fail(f"{self.what} still running after {timeout}s:\n{self.text()[-4000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)


class AggregatorProcess(FleetlearnProcess):
    """`fleetlearn aggregator --broker URL --fleet F --state-dir S [--bundle B] EXTRA...`."""

    what = "aggregator"

    def __init__(self, tmp: Path, url: str, fleet: str, state: Path, *extra: str, bundle: Path | None = None, name: str = "agg"):
        args = ["aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(state), *extra]
        if bundle is not None:
            args += ["--bundle", str(bundle)]
        super().__init__(tmp / f"{name}-{uuid.uuid4().hex[:4]}.log", *args)

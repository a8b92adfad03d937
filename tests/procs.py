"""The aggregator as a real subprocess for tests: its stderr (key=value lines) in a log file."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, stop_process


class AggregatorProcess:
    """`fleetlearn aggregator --broker URL --fleet F --state-dir S [--bundle B] EXTRA...`."""

    def __init__(self, tmp: Path, url: str, fleet: str, state: Path, *extra: str, bundle: Path | None = None, name: str = "agg"):
        self.log = tmp / f"{name}-{uuid.uuid4().hex[:4]}.log"
        cmd = [sys.executable, "-m", "fleetlearn.cli", "aggregator", "--broker", url, "--fleet", fleet, "--state-dir", str(state), *extra]
        if bundle is not None:
            cmd += ["--bundle", str(bundle)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            pytest.fail(f"aggregator still running after {timeout}s:\n{self.text()[-4000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

"""Run every benchmark and print their numbers (`make bench`). Numbers, not pass/fail:
docs/benchmarks.md records what they printed here and what the goals are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in [
    ("bench_device.py", []),
    ("bench_engines.py", []),
    ("bench_round.py", ["--broker", "mosquitto"]),
    ("bench_round.py", ["--broker", "amqtt"]),
    ("bench_ingest.py", []),
    ("bench_swarm.py", []),
    ("bench_emulated.py", []),  # needs root and qemu-user-static; says why when it cannot run
]:
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)

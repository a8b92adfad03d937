"""Run every benchmark and print their numbers (`make bench`). Numbers, not pass/fail:
docs/benchmarks.md records what they printed here and what the goals are.

Each script prints its detail plus `ROW {json}` lines (bench/rows.py: value, same-run baseline,
ratio, goal, load average); at the end every row is printed again as one markdown table, and
written to `--out` (default bench/last-run.md, not committed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rows import markdown_table, parse_rows  # noqa: E402

BENCHES: list[tuple[str, list[str]]] = [
    ("bench_device.py", []),
    ("bench_engines.py", []),
    ("bench_round.py", ["--broker", "mosquitto"]),
    ("bench_round.py", ["--broker", "amqtt"]),
    ("bench_ingest.py", []),
    ("bench_aggregate.py", []),
    ("bench_compress.py", []),
    ("bench_compress.py", ["--dataset", "digits", "--rounds", "10", "--no-large-model"]),
    ("bench_swarm.py", []),
    ("bench_emulated.py", []),  # needs root and qemu-user-static; says why when it cannot run
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="*", default=None, help="run only these scripts (e.g. bench_ingest.py)")
    p.add_argument("--out", type=Path, default=HERE / "last-run.md")
    args = p.parse_args()
    rows = []
    for script, extra in BENCHES:
        if args.only is not None and script not in args.only:
            continue
        print(f"== {script} {' '.join(extra)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *extra], check=True, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        rows += parse_rows(proc.stdout)
    table = markdown_table(rows)
    print("\n" + table)
    args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

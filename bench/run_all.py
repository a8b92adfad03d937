"""Run every benchmark and print their numbers (`make bench`). Numbers, not pass/fail:
docs/benchmarks.md records what they printed here and what the goals are.

Each script prints its detail plus `ROW {json}` lines (bench/rows.py: value, same-run baseline,
ratio, goal, load average); at the end every row is printed again as one markdown table, and
written to `--out` (default bench/last-run.md, not committed). A script that printed no row
(e.g. bench_emulated.py without root) is listed under the table with its last line (its reason);
a malformed row stops the run (`check_row`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rows import markdown_table, parse_rows  # noqa: E402

ROW_KEYS = ("bench", "what", "value", "unit", "baseline_what", "baseline", "goal", "met", "load", "ratio")


def check_row(script: str, row: dict) -> None:
    """A row run_all can print truthfully: every field there, a number, a baseline that says what
    it is, and byte figures that say what they count (which frames, per what)."""
    missing = [k for k in ROW_KEYS if k not in row]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    if not isinstance(row.get("value"), int | float):
        problems.append("value is not a number")
    if not row.get("what") or not row.get("unit"):
        problems.append("empty 'what' or 'unit'")
    if row.get("baseline") is not None and not row.get("baseline_what"):
        problems.append("a baseline without 'baseline_what'")
    if row.get("unit") == "bytes" and " per " not in str(row.get("what")) and " of " not in str(row.get("what")):
        problems.append("a byte figure that does not say what it counts (per device? per round? of what?)")
    if problems:
        raise SystemExit(f"{script}: bad row {row.get('what')!r}: {'; '.join(problems)}")


BENCHES: list[tuple[str, list[str]]] = [
    ("bench_device.py", []),
    ("bench_engines.py", []),
    ("bench_round.py", ["--broker", "mosquitto"]),
    ("bench_round.py", ["--broker", "amqtt"]),
    ("bench_ingest.py", []),
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
    if args.only is not None:
        args.only = [Path(x).name for x in args.only]  # bench/bench_swarm.py works too
    known = {script for script, _ in BENCHES}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        p.error(f"--only {' '.join(unknown)}: not a benchmark here (known: {', '.join(sorted(known))})")
    rows = []
    rowless = []
    for script, extra in BENCHES:
        if args.only is not None and script not in args.only:
            continue
        print(f"== {script} {' '.join(extra)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *extra], check=True, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        got = parse_rows(proc.stdout)
        for row in got:
            check_row(script, row)
        if not got:
            last = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
            rowless.append(f"- {script} {' '.join(extra)}: no rows; it said: {last[0][:300]}")
        rows += got
    table = markdown_table(rows) + ("\n\n" + "\n".join(rowless) if rowless else "")
    print("\n" + table)
    args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

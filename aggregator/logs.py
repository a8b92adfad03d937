"""Structured logs: one line per event, `key=value` pairs, to stderr through `logging`.

    ts=2025-01-01T12:00:00.123Z level=info logger=fleetlearn.aggregator event=update_accepted device=pi-07 round=3 samples=135

Values holding spaces, quotes or `=` are JSON-quoted so a line always splits unambiguously.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def kv_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t\\'):
        return json.dumps(text)
    return text


def kv(**fields: Any) -> str:
    """`event=x round=3 device=d` from keyword arguments, in the order given; None is skipped."""
    return " ".join(f"{k}={kv_value(v)}" for k, v in fields.items() if v is not None)


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            # Keep one line per event: the traceback's last line is the reason.
            exc = record.exc_info[1]
            line += " " + kv(exc=f"{type(exc).__name__}: {exc}")
        return line.replace("\n", " ")


def setup_logging(level: str = "info") -> int:
    """Send fleetlearn's logs to stderr as key=value lines (once per process); returns the level."""
    lvl = LEVELS.get(str(level).lower())
    if lvl is None:
        from fleetlearn.edge_runtime.core.errors import UsageError

        raise UsageError(f"--log-level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    if not any(getattr(h, "_fleetlearn", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KVFormatter())
        handler._fleetlearn = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(lvl)
    return lvl

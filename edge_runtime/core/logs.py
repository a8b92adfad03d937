"""Structured logs for every fleetlearn process: one line per event, to stderr via `logging`.

Two formats of the same events (`--log-format text|json`):

    ts=2025-01-01T12:00:00.123Z level=info logger=fleetlearn.device event=update_sent device=pi-07 round=3 samples=135
    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "fleetlearn.device", "event": "update_sent", "device": "pi-07", "round": 3, "samples": 135}

Call sites log `key=value` messages built with `kv()` (values holding spaces, quotes or `=` are
JSON-quoted, so a line always splits unambiguously). The JSON formatter splits that message
back into fields, so both formats carry the same event names and fields with no second set of
call sites (values formatted with %r, Python's quotes, are read too); digits become numbers, `true`/`false` booleans, `-` (no round yet) null. A message
that is not key=value (a library's) becomes {"msg": ...}. journald and log shippers read one
JSON object per line.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")


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


# key=value, the value bare (no spaces), a JSON string ("..." with escapes) or, from call sites
# that format with %r, a Python string literal ('...')
_PAIR = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")
_INT = re.compile(r"^-?(0|[1-9][0-9]{0,17})$")
_FLOAT = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")


def _typed(raw: str) -> Any:
    if raw[:1] in ("'", '"') and len(raw) >= 2:
        try:
            return json.loads(raw) if raw[0] == '"' else ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            try:
                return ast.literal_eval(raw)  # a Python repr in double quotes
            except (ValueError, SyntaxError):
                return raw
    if _INT.match(raw):
        return int(raw)
    if _FLOAT.match(raw):
        number = float(raw)
        return number if abs(number) != float("inf") else raw
    return {"true": True, "false": False, "-": None}.get(raw, raw)


def parse_kv(message: str) -> dict[str, Any] | None:
    """The fields of a `kv()` message, or None when the message is not key=value pairs."""
    out: dict[str, Any] = {}
    pos = 0
    message = message.rstrip()
    while pos < len(message):
        m = _PAIR.match(message, pos)
        if m is None or (m.end() < len(message) and not message[m.end()].isspace()):
            return None
        out[m.group(1)] = _typed(m.group(2))
        pos = m.end()
    return out or None


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _exc_text(record: logging.LogRecord) -> str | None:
    # One line per event: the exception's own line is the reason, not the traceback.
    if not record.exc_info or record.exc_info[1] is None:
        return None
    exc = record.exc_info[1]
    return f"{type(exc).__name__}: {exc}"


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={_ts(record)} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        exc = _exc_text(record)
        if exc:
            line += " " + kv(exc=exc)
        return line.replace("\n", " ")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then the event's fields (or msg)."""

    RESERVED = ("ts", "level", "logger")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        fields = parse_kv(message)
        if fields is None:
            doc["msg"] = message
        else:
            for key, value in fields.items():
                doc[f"field_{key}" if key in self.RESERVED else key] = value
        exc = _exc_text(record)
        if exc:
            doc["exc"] = exc
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> int:
    """Send fleetlearn's logs to stderr, one line per event in `fmt` (once per process; a
    second call changes level and format); returns the level."""
    from fleetlearn.edge_runtime.core.errors import UsageError

    lvl = LEVELS.get(str(level).lower())
    if lvl is None:
        raise UsageError(f"--log-level {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise UsageError(f"--log-format {fmt!r} is not one of {', '.join(FORMATS)}")
    formatter = JsonFormatter() if fmt == "json" else KVFormatter()
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_fleetlearn", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._fleetlearn = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(formatter)
    root.setLevel(lvl)
    return lvl


def add_log_arguments(parser: Any) -> None:
    """--log-level and --log-format, the same on every long-running command."""
    parser.add_argument("--log-level", default="info", choices=list(LEVELS), help="log verbosity (default info)")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=list(FORMATS),
        help="text (key=value) or json (one object per line, for journald and log shippers); default text",
    )

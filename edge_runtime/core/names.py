"""Names that go into MQTT topic levels and file names: device ids, fleet names, users."""

from __future__ import annotations

import re
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError

# Device ids and fleet names go into MQTT topics and file names: no wildcards (+ #), no
# separators (/), no whitespace or control characters. Letters, digits, '.', '_' and '-'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: Any, what: str) -> str:
    """Return `value` if it is safe in an MQTT topic level and a file name, else raise ConfigError."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-' "
            "(no '+', '#', '/', whitespace or control characters), starting with a letter or digit"
        )
    return value

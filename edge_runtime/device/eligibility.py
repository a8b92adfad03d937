"""When a device may train: the `[eligibility]` table of its config, checked before each round.

    [eligibility]
    max_cpu_temp_c = 70              # no training above this CPU temperature
    min_free_disk_mb = 200           # MiB (2^20 bytes) free in the state dir's filesystem
    hours = ["01:00-05:00", "22:30-23:30"]   # local time windows; "22:00-02:00" crosses midnight
    require_ac_power = true          # not on battery
    check_interval_s = 30            # how often an ineligible device looks again

Every rule is optional; none given means always eligible. A rule whose reading the board does
not expose (no thermal zone, no power_supply entry) makes the device ineligible with that
reason: the operator asked for a guarantee the device cannot check, and guessing would break
it. An ineligible device does not train; it reports `ineligible` and the first failing rule in
its status, keeps the round's global model, and trains on it when it becomes eligible again.
A window is [start, end): "01:00-05:00" admits 01:00 up to 04:59:59.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.core.protocol import Health

WINDOW_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]|24):([0-5][0-9])$")
MAX_WINDOWS = 48


@dataclass(frozen=True)
class Window:
    start: int  # minutes after local midnight
    end: int

    def admits(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # crosses midnight

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class EligibilityConfig:
    max_cpu_temp_c: float | None = None
    min_free_disk_mb: float | None = None
    hours: tuple[Window, ...] = ()
    require_ac_power: bool = False
    check_interval_s: float = 30.0

    @property
    def any_rule(self) -> bool:
        return self.max_cpu_temp_c is not None or self.min_free_disk_mb is not None or bool(self.hours) or self.require_ac_power


def parse_window(text: str, where: str) -> Window:
    m = WINDOW_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f'key {where!r}: {str(text)[:40]!r} is not a time window like "01:00-05:00" (24-hour local time)')
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end > 24 * 60:
        raise ConfigError(f"key {where!r}: {text!r} ends after 24:00")
    if start == end % (24 * 60):
        raise ConfigError(f"key {where!r}: {text!r} is empty or the whole day (leave 'hours' out to allow any time)")
    return Window(start, end % (24 * 60))


def _number(values: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    v = values.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"key 'eligibility.{key}' must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def parse_eligibility(values: Any) -> EligibilityConfig:
    """Strict: unknown keys, wrong types and malformed windows are one-line ConfigErrors."""
    if not isinstance(values, dict):
        raise ConfigError("'eligibility' must be a table")
    known = {"max_cpu_temp_c", "min_free_disk_mb", "hours", "require_ac_power", "check_interval_s"}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key 'eligibility.{key}' (known: {', '.join(sorted(known))})")
    hours = values.get("hours", [])
    if isinstance(hours, str):
        hours = [h for h in hours.split(",") if h.strip()] or [hours]
    if not isinstance(hours, list) or len(hours) > MAX_WINDOWS:
        raise ConfigError(
            f"key 'eligibility.hours' must be a window string or a list of at most {MAX_WINDOWS}, like [\"01:00-05:00\"]"
        )
    ac = values.get("require_ac_power", False)
    if not isinstance(ac, bool):
        raise ConfigError(f"key 'eligibility.require_ac_power' must be true or false, got {ac!r}")
    interval = _number(values, "check_interval_s", 0.1, 86400)
    return EligibilityConfig(
        max_cpu_temp_c=_number(values, "max_cpu_temp_c", -50, 200),
        min_free_disk_mb=_number(values, "min_free_disk_mb", 0, 1 << 40),
        hours=tuple(parse_window(h, f"eligibility.hours[{i}]") for i, h in enumerate(hours)),
        require_ac_power=ac,
        check_interval_s=30.0 if interval is None else interval,
    )


def ineligible_reason(rules: EligibilityConfig, health: Health, now: time.struct_time | None = None) -> str | None:
    """None when the device may train now, else the first failing rule as a short sentence."""
    if rules.hours:
        t = time.localtime() if now is None else now
        minute = t.tm_hour * 60 + t.tm_min
        if not any(w.admits(minute) for w in rules.hours):
            return f"outside training hours {', '.join(map(str, rules.hours))} (local time {t.tm_hour:02d}:{t.tm_min:02d})"
    if rules.max_cpu_temp_c is not None:
        if health.cpu_temp_c is None:
            return "max_cpu_temp_c is set but this board exposes no CPU temperature"
        if health.cpu_temp_c > rules.max_cpu_temp_c:
            return f"CPU at {health.cpu_temp_c:.1f} C, above max_cpu_temp_c {rules.max_cpu_temp_c:g}"
    if rules.min_free_disk_mb is not None:
        if health.free_disk_bytes is None:
            return "min_free_disk_mb is set but free disk space cannot be read"
        free_mb = health.free_disk_bytes / 2**20
        if free_mb < rules.min_free_disk_mb:
            return f"{free_mb:.0f} MiB free in the state dir, below min_free_disk_mb {rules.min_free_disk_mb:g}"
    if rules.require_ac_power:
        if health.power_source is None:
            return "require_ac_power is set but this board reports no power supply"
        if health.power_source != "ac":
            return f"on {health.power_source} power, require_ac_power is set"
    return None


class EligibilityGate:
    """The agent's side of the rules: holds a round's global model while the device is
    ineligible and says when to look again. `read_health` returns current Health readings."""

    def __init__(self, rules: EligibilityConfig, read_health: Any, refresh_s: float):
        self.rules = rules
        self.read_health = read_health
        self.period = min(rules.check_interval_s, refresh_s)
        self.parked: Any = None  # the GlobalModel to train on once eligible
        self.next_check = 0.0

    def refuse(self, g: Any) -> str | None:
        """None: train g now. Else the reason, and g is held for later."""
        reason = ineligible_reason(self.rules, self.read_health()) if self.rules.any_rule else None
        # Training g now supersedes any older round held before: never train that one later.
        self.parked = g if reason is not None else None
        if reason is not None:
            self.next_check = time.monotonic() + self.rules.check_interval_s
        return reason

    def due(self, now: float) -> bool:
        if now < self.next_check:
            return False
        self.next_check = now + self.period
        return True

    def verdict(self, state: str, detail: str) -> str | None:
        """For a device in `state` (idle or ineligible): "eligible" when an ineligible device
        may train again, a new reason when it is (still) ineligible, None when nothing changed."""
        if not self.rules.any_rule or state not in ("idle", "ineligible"):
            return None
        reason = ineligible_reason(self.rules, self.read_health())
        if reason is None:
            return "eligible" if state == "ineligible" else None
        return reason if reason != detail else None

    def drop_until(self, round_: int) -> None:
        if self.parked is not None and self.parked.round <= round_:
            self.parked = None  # that round is over: nothing to train on when eligible again

    def take(self) -> Any:
        g, self.parked = self.parked, None
        return g

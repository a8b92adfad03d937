"""A device's health readings, for its status and its eligibility rules.

    uptime_s         seconds since this device process started (monotonic clock)
    rss_bytes        resident memory of this process (/proc/self/statm x page size)
    free_disk_bytes  free bytes on the state dir's filesystem, for an unprivileged user (statvfs)
    cpu_temp_c       the hottest CPU thermal zone: SYSFS/class/thermal/thermal_zone*/temp
                     (millidegrees C); zones whose `type` names a CPU/SoC/package are preferred;
                     a board whose zones name none of those reports its hottest zone
    power_source     "ac" when a Mains/USB supply under SYSFS/class/power_supply is online,
                     "battery" when only batteries are there, absent when it lists nothing

A reading the board does not expose is None (left out of the status), never guessed: a board
without thermal zones has no cpu_temp_c, a desktop without power_supply entries no
power_source. SYSFS is the config's `sysfs_root` ("/sys"), so tests fake the files in a
temp dir. Every file read is bounded and its failure costs only that reading.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from fleetlearn.edge_runtime.core.protocol import Health

CPU_ZONE = re.compile(r"cpu|soc|x86_pkg|package|core", re.IGNORECASE)
MAX_ZONES = 64  # a board lists a handful; bound the work whatever the directory holds


def _read(path: Path, limit: int = 64) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace").strip()
    except OSError:
        return None


def cpu_temp_c(sysfs: Path) -> float | None:
    """The hottest CPU thermal zone in degrees C, or None when there is none to read."""
    cpu: list[float] = []
    other: list[float] = []
    zones = sorted((sysfs / "class" / "thermal").glob("thermal_zone*"))[:MAX_ZONES]
    for zone in zones:
        raw = _read(zone / "temp")
        try:
            value = int(raw) / 1000.0 if raw is not None else None
        except ValueError:
            value = None
        if value is None or not -100.0 <= value <= 300.0:
            continue  # unreadable or absurd: no reading beats a wrong one
        (cpu if CPU_ZONE.search(_read(zone / "type") or "") else other).append(value)
    readings = cpu or other
    return max(readings) if readings else None


def power_source(sysfs: Path) -> str | None:
    """ "ac" when an external supply is online, "battery" when only batteries exist, else None."""
    saw_battery = False
    for supply in sorted((sysfs / "class" / "power_supply").glob("*"))[:MAX_ZONES]:
        kind = (_read(supply / "type") or "").lower()
        if kind == "battery":
            saw_battery = True
        elif kind in ("mains", "usb", "usb_c", "usb_pd", "usb_dcp", "usb_cdp", "wireless") and _read(supply / "online") == "1":
            return "ac"
    return "battery" if saw_battery else None


def rss_bytes() -> int | None:
    raw = _read(Path("/proc/self/statm"))
    try:
        return int(raw.split()[1]) * os.sysconf("SC_PAGE_SIZE") if raw else None
    except (ValueError, IndexError, OSError):
        return None


def free_disk_bytes(path: Path) -> int | None:
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


class HealthReader:
    """Reads the current Health of this process and board (cheap: a few small files)."""

    def __init__(self, state_dir: Path, sysfs_root: str | Path = "/sys"):
        self.state_dir = Path(state_dir)
        self.sysfs = Path(sysfs_root)
        self.started = time.monotonic()

    def read(self) -> Health:
        return Health(
            uptime_s=round(time.monotonic() - self.started, 1),
            rss_bytes=rss_bytes(),
            free_disk_bytes=free_disk_bytes(self.state_dir),
            cpu_temp_c=cpu_temp_c(self.sysfs),
            power_source=power_source(self.sysfs),
        )

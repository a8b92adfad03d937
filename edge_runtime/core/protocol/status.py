"""A device's retained status (`status/<device>`) and its health readings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import (
    MAX_ROUND,
    NAME_RE,
    check_float,
    check_int,
    check_str,
    decode_json,
    encode_json,
)

ENGINES = ("ort-training", "portable")  # the device's training engines (edge_runtime/engines)
ARCH_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")  # platform.machine(): x86_64, aarch64, armv7l...
DEVICE_STATES = ("idle", "fetching", "training", "uploading", "error", "offline", "ineligible")
POWER_SOURCES = ("ac", "battery")


@dataclass(frozen=True)
class Health:
    """A device's health readings in its status (`health` object). A reading the board does not
    expose is None and left out of the JSON, never guessed; decode bounds every value."""

    uptime_s: float | None = None  # seconds since the device process started
    rss_bytes: int | None = None  # resident memory of the device process
    free_disk_bytes: int | None = None  # free space on the state dir's filesystem
    cpu_temp_c: float | None = None  # hottest CPU thermal zone (/sys/class/thermal)
    power_source: str | None = None  # "ac" or "battery" (/sys/class/power_supply)

    BOUNDS = {"uptime_s": (0.0, 1e10), "rss_bytes": (0, 1 << 50), "free_disk_bytes": (0, 1 << 62), "cpu_temp_c": (-100.0, 300.0)}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, d: Any) -> Health:
        if not isinstance(d, dict):
            raise ProtocolError("status health must be an object")
        values: dict[str, Any] = {}
        for key, (lo, hi) in cls.BOUNDS.items():
            if d.get(key) is not None:
                values[key] = check_int(d, key, int(lo), int(hi)) if isinstance(lo, int) else check_float(d, key, lo, hi)
        power = d.get("power_source")
        if power is not None and power not in POWER_SOURCES:
            raise ProtocolError(f"status health power_source {str(power)[:20]!r} not one of {POWER_SOURCES}")
        return cls(power_source=power, **values)


@dataclass(frozen=True)
class Status:
    """Retained on `status/<device>`; the broker publishes the `offline` Last Will for us.
    `ineligible`: the device's [eligibility] rules say no training now, `detail` says why.
    `engine` (which training engine the device runs, once its bundle is loaded) and `arch` (its
    CPU architecture) tell an operator what runs where in a mixed fleet."""

    device_id: str
    state: str
    round: int = 0
    detail: str = ""
    ts: float = 0.0
    health: Health | None = None
    engine: str | None = None
    arch: str | None = None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "device_id": self.device_id,
            "state": self.state,
            "round": self.round,
            "detail": self.detail[:300],
            "ts": self.ts,
        }
        if self.health is not None:
            doc["health"] = self.health.to_json()
        doc.update({k: v for k, v in (("engine", self.engine), ("arch", self.arch)) if v is not None})
        return encode_json(doc)

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        d = decode_json(payload, "status")
        if d.get("state") not in DEVICE_STATES:
            raise ProtocolError(f"status state {d.get('state')!r} not one of {DEVICE_STATES}")
        health = Health.from_json(d["health"]) if d.get("health") is not None else None
        engine = d.get("engine")
        if engine is not None and engine not in ENGINES:
            raise ProtocolError(f"status engine {str(engine)[:40]!r} not one of {ENGINES}")
        arch = check_str(d, "arch", ARCH_RE) if d.get("arch") is not None else None
        return cls(
            check_str(d, "device_id", NAME_RE),
            d["state"],
            check_int(d, "round", 0, MAX_ROUND),
            str(d.get("detail", ""))[:300],
            check_float(d, "ts", 0.0),
            health,
            engine,
            arch,
        )

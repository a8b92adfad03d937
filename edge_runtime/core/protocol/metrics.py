"""RoundMetrics: what one closed round reported, on the `metrics` topic and in `rounds.jsonl`.

The aggregator publishes it retained on `fleetlearn/<fleet>/metrics` (the JSON envelope with
"v": 1) and appends the same object, without the envelope, as one line per round to
`STATE_DIR/rounds.jsonl` (fleetlearn.aggregator.round_log reads and writes that file).

Adding a field is one edit: declare it below with the kind of value it holds (`count`,
`number`, `norm` (a number >= 0), `text`, `names`, `flag`); decoding, encoding and the reader follow. A field is
optional unless noted: None (or a missing key, or JSON null: a non-finite value the aggregator
could not write) means "not reported", and None fields are left out when encoding. Keys this
version does not know are kept in `extra`, so a newer aggregator's fields survive an older
reader, and a rewrite of the log keeps them.

Decoding treats its input as hostile, like every message: a known field of the wrong type or
range is a ProtocolError with a one-line reason naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol.fields import (
    HEX32_RE,
    MAX_JSON_BYTES,
    MAX_ROUND,
    NAME_RE,
    check_float,
    check_int,
    check_str,
    decode_json,
    encode_json,
)

MAX_COUNT = 2**63 - 1
MAX_TEXT = 200
# Preferred names first: when a record carries several test metrics, this picks the headline.
TEST_METRIC_PREFERENCE = ("test_mse", "test_accuracy", "test_loss", "test_mae", "test_rmse")


def _count(doc: dict, key: str) -> int:
    return check_int(doc, key, 0, MAX_COUNT)


def _number(doc: dict, key: str) -> float:
    return check_float(doc, key)


def _norm(doc: dict, key: str) -> float:
    return check_float(doc, key, 0.0)


def _text(doc: dict, key: str) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or len(v) > MAX_TEXT or not v.isprintable():
        raise ProtocolError(f"field {key!r} must be printable text of at most {MAX_TEXT} characters, got {v!r:.40}")
    return v


def _flag(doc: dict, key: str) -> bool:
    v = doc.get(key)
    if not isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be true or false, got {v!r:.40}")
    return v


def _names(doc: dict, key: str) -> tuple[str, ...]:
    """Device ids, given as names or as objects naming one (`device_id`, or `device`)."""
    v = doc.get(key)
    if not isinstance(v, list):
        raise ProtocolError(f"field {key!r} must be a list of device ids")
    out = []
    for item in v:
        if isinstance(item, dict):
            item = item.get("device_id", item.get("device"))
        if not isinstance(item, str) or not NAME_RE.fullmatch(item):
            raise ProtocolError(f"field {key!r} holds {item!r:.40}, not a device id")
        out.append(item)
    return tuple(out)


def _run_id(doc: dict, key: str) -> str:
    return check_str(doc, key, HEX32_RE)


KINDS: dict[str, Callable[[dict, str], Any]] = {
    "count": _count,
    "number": _number,
    "norm": _norm,
    "text": _text,
    "flag": _flag,
    "names": _names,
    "run_id": _run_id,
}


def _f(kind: str, default: Any = None) -> Any:
    return field(default=default, metadata={"kind": kind})


@dataclass(frozen=True)
class RoundMetrics:
    """One closed round. Fields in the order they are written; docs/aggregator.md has the meanings."""

    round: int  # required: 0 .. MAX_ROUND
    run_id: str = _f("run_id", "")
    devices: tuple[str, ...] = _f("names", ())  # whose updates were counted
    devices_truncated: bool | None = _f("flag")  # the metrics message cut `devices` to fit
    accepted: int | None = _f("count")
    invited: tuple[str, ...] = _f("names", ())  # client sampling: the devices asked to train this round
    invited_truncated: bool | None = _f("flag")  # the metrics message cut `invited` to fit
    connected: int | None = _f("count")  # client sampling: the connected devices the cohort was drawn from
    samples: int | None = _f("count")
    train_loss: float | None = _f("number")
    test_mse: float | None = _f("number")
    test_accuracy: float | None = _f("number")
    test_loss: float | None = _f("number")
    eval_s: float | None = _f("number")
    wall_s: float | None = _f("number")
    bytes_in: int | None = _f("count")
    bytes_out: int | None = _f("count")  # everything the round published: the global model, acks, ...
    global_bytes: int | None = _f("count")  # the global-model frame(s) that opened the round (each device receives them once)
    deadline_extensions: int | None = _f("count")
    rejected: int | None = _f("count")  # also read from a list naming the devices (-> rejected_devices)
    rejected_devices: tuple[str, ...] = _f("names", ())
    closed_by: str | None = _f("text")
    strategy: str | None = _f("text")
    proximal_mu: float | None = _f("number")  # FedProx's mu the devices trained with (absent: 0)
    opened_at: float | None = _f("number")
    closed_at: float | None = _f("number")
    clip_norm: float | None = _f("number")
    clipped: int | None = _f("count")
    update_norm: float | None = _f("norm")  # sample-weighted mean L2 norm of the accepted deltas (before clipping)
    update_norm_median: float | None = _f("norm")
    update_norm_max: float | None = _f("norm")  # the largest of them
    trim_fraction: float | None = _f("number")
    trimmed: int | None = _f("count")
    epsilon: float | None = _f("number")
    delta: float | None = _f("number")
    noise_multiplier: float | None = _f("number")
    dp_sampling_rate: float | None = _f("number")
    dp_expected_participants: float | None = _f("number")
    dp_accountant: str | None = _f("text")
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know

    # ------------------------------------------------------------ JSON object

    @classmethod
    def from_doc(cls, doc: Any) -> RoundMetrics:
        """Check one metrics object (a line of rounds.jsonl, or a message's body)."""
        if not isinstance(doc, dict):
            raise ProtocolError("round metrics must be a JSON object")
        values: dict[str, Any] = {"round": check_int(doc, "round", 0, MAX_ROUND)}
        known = {"v", "round"}
        for f in fields(cls):
            kind = f.metadata.get("kind")
            if kind is None:
                continue
            known.add(f.name)
            if doc.get(f.name) is None:
                continue
            if f.name == "rejected" and isinstance(doc["rejected"], list):
                # The naming form: the devices whose updates were refused.
                values["rejected_devices"] = _names(doc, "rejected")
                values["rejected"] = len(values["rejected_devices"])
                continue
            values[f.name] = KINDS[kind](doc, f.name)
        values["extra"] = {k: v for k, v in doc.items() if k not in known}
        return cls(**values)

    def to_doc(self) -> dict[str, Any]:
        """The JSON object, reported fields only, unknown ones (`extra`) last."""
        out: dict[str, Any] = {"round": self.round}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("kind") is None or value is None or value == "" or value == ():
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    # ------------------------------------------------------------ the metrics message

    def encode(self, max_bytes: int = MAX_JSON_BYTES) -> bytes:
        """The retained metrics message. When the device lists would push it over `max_bytes` (what
        every JSON decoder accepts), the published `invited` list, then `devices`, is cut and
        `invited_truncated` / `devices_truncated` set; rounds.jsonl keeps the whole lists."""
        doc = self.to_doc()
        payload = encode_json(doc)
        for key in ("invited", "devices"):
            names = list(getattr(self, key))
            while names and len(payload) > max_bytes:
                names = names[: len(names) // 2]
                doc.update({key: names, f"{key}_truncated": True})
                payload = encode_json(doc)
        return payload

    @classmethod
    def decode(cls, payload: bytes) -> RoundMetrics:
        doc = decode_json(payload, "metrics")
        try:
            return cls.from_doc(doc)
        except ProtocolError as exc:
            raise ProtocolError(f"metrics: {exc.reason}") from None

    # ------------------------------------------------------------ views

    @property
    def test_metric(self) -> str | None:
        """The headline test metric's name (e.g. "test_mse"), or None when none was reported."""
        return self._test()[0]

    @property
    def test_value(self) -> float | None:
        return self._test()[1]

    def _test(self) -> tuple[str | None, float | None]:
        values = {k: getattr(self, k) for k in ("test_mse", "test_accuracy", "test_loss")}
        for k in self.extra:
            if isinstance(k, str) and k.startswith("test_"):
                try:
                    values[k] = check_float(self.extra, k)
                except ProtocolError:
                    continue
        ranked = [*TEST_METRIC_PREFERENCE, *sorted(k for k in values if k not in TEST_METRIC_PREFERENCE)]
        for name in ranked:
            if values.get(name) is not None:
                return name, values[name]
        return None, None

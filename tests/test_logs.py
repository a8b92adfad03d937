"""`--log-format json`: one JSON object per line with the text format's event names and fields,
from real device and aggregator processes; and the shared formatter's parsing, unit by unit."""

from __future__ import annotations

import json
import logging
import secrets
import time

from fleetlearn.edge_runtime.core.logs import JsonFormatter, KVFormatter, kv, parse_kv
from fleetlearn.edge_runtime.core.protocol import Topics
from tests.peers import Peer
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, global_frame, start_device, wait_log, write_config


def record(msg: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord(
        "fleetlearn.device", logging.WARNING, __file__, 1, msg, args, (type(exc), exc, None) if exc else None
    )


def test_json_and_text_carry_the_same_event_and_fields():
    message = kv(event="update_refused", device="pi-7", round=3, reason='bad "delta" = yes', loss=0.25, ok=False)
    text = KVFormatter().format(record("%s", message))
    doc = json.loads(JsonFormatter().format(record("%s", message)))
    assert text.endswith(" " + message) and "level=warning logger=fleetlearn.device" in text
    assert doc["level"] == "warning" and doc["logger"] == "fleetlearn.device" and doc["ts"].endswith("Z")
    assert {k: doc[k] for k in ("event", "device", "round", "reason", "loss", "ok")} == {
        "event": "update_refused",
        "device": "pi-7",
        "round": 3,
        "reason": 'bad "delta" = yes',
        "loss": 0.25,
        "ok": False,
    }
    # %r-formatted values (Python quotes), a round not known yet, an exception: still one object.
    doc = json.loads(
        JsonFormatter().format(record("event=x device=d round=- error=%r", "[Errno 111] refused", exc=ValueError("bad\nthing")))
    )
    assert doc["error"] == "[Errno 111] refused" and doc["round"] is None and doc["exc"] == "ValueError: bad\nthing"
    # A library's free-text message, and a field named like a reserved one.
    assert json.loads(JsonFormatter().format(record("Client x connected")))["msg"] == "Client x connected"
    assert json.loads(JsonFormatter().format(record("event=y level=9")))["field_level"] == 9
    assert parse_kv("a=1 b") is None and parse_kv('a="unterminated') == {"a": '"unterminated'}  # kept, not lost


def json_lines(text: str) -> list[dict]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines
    return [json.loads(ln) for ln in lines]  # every line is one JSON object


def test_device_log_format_json(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    t = Topics(FLEET)
    peer = Peer(mosquitto.url, [t.all_updates])
    peer.publish(t.global_model, global_frame(boston_bundle, secrets.token_hex(16), 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--log-format", "json")
    try:
        wait_log(log, '"update_sent"', timeout=60)
    finally:
        proc.terminate()
        proc.wait(15)
        peer.close()
    docs = json_lines(log.read_text())
    sent = next(d for d in docs if d.get("event") == "update_sent")
    assert sent["device"] == "dev-0" and sent["round"] == 1 and sent["samples"] > 0 and sent["level"] == "info"
    assert {"device_start", "mqtt_connected", "device_stop"} <= {d.get("event") for d in docs}


def test_aggregator_log_format_json(mosquitto, tmp_path, boston_bundle):
    agg = AggregatorProcess(
        tmp_path,
        mosquitto.url,
        "jsonlogs",
        tmp_path / "agg",
        "--rounds",
        "1",
        "--min-devices",
        "1",
        "--deadline",
        "600",
        "--log-format",
        "json",
        bundle=boston_bundle,
    )
    try:
        deadline = time.monotonic() + 60
        while '"round_open"' not in agg.text():
            assert time.monotonic() < deadline, agg.text()[-2000:]
            assert agg.proc.poll() is None, agg.text()[-2000:]
            time.sleep(0.1)
    finally:
        agg.stop()
    docs = json_lines(agg.text())
    assert all(d["logger"].startswith("fleetlearn") or "msg" in d for d in docs)
    assert any(d.get("event") == "mqtt_connected" for d in docs)

"""Prometheus metrics: the exporter against a real Prometheus server (Debian's `prometheus`),
the `--metrics-port` flags of the aggregator and the monitor, and the Grafana dashboard's
queries against the names a real aggregator serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fleetlearn.aggregator.metrics import REJECTION_REASONS, DeviceGauges, MetricsExporter, rejection_reason
from tests.conftest import ROOT, free_port, stop_process, wait_port
from tests.test_device import FLEET, start_device, write_config

DASHBOARD = ROOT / "provisioning" / "grafana" / "fleetlearn.json"


# ------------------------------------------------------------------ helpers


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def served_samples(text: str) -> dict[str, list]:
    """Sample name -> samples, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


class Prometheus:
    """A real Prometheus server scraping `targets` every second, its data in a temp dir."""

    def __init__(self, tmp: Path, targets: list[str]):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("Debian's prometheus is not installed (`make test` installs it: apt-get install prometheus)")
        self.port = free_port()
        conf = tmp / "prometheus.yml"
        conf.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: fleetlearn\n    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
        )
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={conf}",
                f"--storage.tsdb.path={tmp / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
        )
        wait_port(self.port, 30)
        self._wait_ready()

    def _wait_ready(self) -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready:\n{self.log.read_text(errors='replace')[-2000:]}")

    def query(self, expr: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with a JSON error body
            return json.loads(exc.read())

    def scalar(self, expr: str) -> float | None:
        doc = self.query(expr)
        assert doc["status"] == "success", doc
        result = doc["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, predicate, timeout: float = 30.0) -> float:
        end = time.monotonic() + timeout
        v = None
        while time.monotonic() < end:
            v = self.scalar(expr)
            if v is not None and predicate(v):
                return v
            time.sleep(0.5)
        raise AssertionError(f"{expr} = {v} after {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc)


# ------------------------------------------------------------------ PromQL names


PROMQL_WORDS = {
    # aggregation operators and keywords
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions (followed
    by `(`), keywords, label names inside {...} or by/without (...), strings, durations or
    Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "{}", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "[]", e)  # range durations, $__rate_interval
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables
    e = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])\b", "", e)  # durations (offset 5m) and numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end() :].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if t.get("expr")]


def test_promql_name_parser():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~"$job", x="y(z)"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert promql_metric_names('a / clamp_min(b{l="1"}, 1) + sum without (state) (c_total offset 5m)') == {"a", "b", "c_total"}


def test_dashboard_is_provisioning_ready_json():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "fleetlearn" and doc["panels"] and "id" not in doc  # no instance id: importable anywhere
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in ("round", "test metric", "duration", "participation", "rejected", "devices"):
        assert topic in titles, topic
    assert all(p["datasource"]["uid"] == "${datasource}" for p in doc["panels"])


# ------------------------------------------------------------------ units


def test_rejection_reasons_map_to_a_fixed_set_from_real_validation():
    """Reasons produced by the real validation code, never free text in a label."""
    import numpy as np

    from fleetlearn.aggregator.validation import Rejection, validate_update
    from fleetlearn.edge_runtime.core.protocol import Topics, Update

    class Version:
        run_id, model_hash, open_round = "a" * 32, "b" * 64, 3

        def check_version(self, run_id, model_hash, rnd):
            from fleetlearn.aggregator.model_store import ModelStore

            return ModelStore.check_version(self, run_id, model_hash, rnd)  # type: ignore[arg-type]

    t = Topics("f")
    good = dict(
        run_id="a" * 32,
        round=3,
        device_id="d1",
        model_hash="b" * 64,
        samples=1,
        train_loss=0.0,
        train_s=0.0,
        nonce="c" * 32,
        delta=np.zeros(4, np.float32),
    )

    def reason(topic: str, payload: bytes, accepted=None) -> str:
        with pytest.raises(Rejection) as exc:
            validate_update(topic, payload, topics=t, num_params=4, version=Version(), accepted=accepted or {})
        return exc.value.reason

    cases = {
        "malformed": reason(t.update("d1"), b"garbage that is no frame"),
        "too_large": reason(t.update("d1"), b"x" * 10_000),
        "identity": reason(t.update("d2"), Update(**good).encode()),
        "stale": reason(t.update("d1"), Update(**{**good, "round": 2}).encode()),
        "not_open": reason(t.update("d1"), Update(**{**good, "round": 4}).encode()),
        "wrong_run": reason(t.update("d1"), Update(**{**good, "run_id": "e" * 32}).encode()),
        "wrong_model": reason(t.update("d1"), Update(**{**good, "model_hash": "f" * 64}).encode()),
        "duplicate": reason(t.update("d1"), Update(**good).encode(), accepted={"d1": "9" * 32}),
    }
    assert {k: rejection_reason(v) for k, v in cases.items()} == {k: k for k in cases}
    assert rejection_reason("replay: nonce ab12cd34 was already used in round 2") == "replay"
    assert rejection_reason("unsigned update; this aggregator requires signed updates") == "signature"
    assert rejection_reason("something new, device pi-07") == "other"
    assert set(REJECTION_REASONS) >= {rejection_reason(v) for v in cases.values()}


def test_device_gauges_count_states_and_per_device_series():
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    g = DeviceGauges(reg, per_device=True)
    g.update("a", "training")
    g.update("b", "training")
    g.update("b", "offline")
    g.update("c", "no-such-state")
    g.update("a", None)  # cleared
    s = served_samples(generate_latest(reg).decode())
    assert value(s, "fleetlearn_devices", state="training") == 0 and value(s, "fleetlearn_devices", state="offline") == 1
    assert value(s, "fleetlearn_devices", state="unknown") == 1 and value(s, "fleetlearn_devices", state="idle") == 0
    assert {(x.labels["device"], x.labels["state"]) for x in s["fleetlearn_device_state"]} == {("b", "offline"), ("c", "unknown")}
    reg2 = CollectorRegistry()
    DeviceGauges(reg2).update("a", "idle", {"cpu_temp_c": 50.0})  # without per_device: no series names a device
    assert not [name for name in served_samples(generate_latest(reg2).decode()) if name.startswith("fleetlearn_device_")]


def test_device_health_gauges_follow_the_status_and_never_guess():
    """Per device, the status's health readings become gauges; a reading the board does not
    expose (absent from Health) has no series, and a cleared status removes them all."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    g = DeviceGauges(reg, per_device=True)
    g.update("pi", "idle", {"cpu_temp_c": 61.5, "rss_bytes": 70_000_000, "uptime_s": 12.0})
    g.update("vm", "idle", {"rss_bytes": 80_000_000})  # no thermal zone on this board
    s = served_samples(generate_latest(reg).decode())
    assert value(s, "fleetlearn_device_cpu_temp_celsius", device="pi") == 61.5
    assert {x.labels["device"] for x in s["fleetlearn_device_cpu_temp_celsius"]} == {"pi"}
    assert value(s, "fleetlearn_device_rss_bytes", device="vm") == 80_000_000
    g.update("pi", "training", {"rss_bytes": 71_000_000})  # the temperature reading went away
    g.update("vm", None)  # cleared
    s = served_samples(generate_latest(reg).decode())
    assert not s.get("fleetlearn_device_cpu_temp_celsius") and not s.get("fleetlearn_device_uptime_seconds")
    assert {x.labels["device"] for x in s["fleetlearn_device_rss_bytes"]} == {"pi"}


def test_two_exporters_share_no_state():
    a, b = MetricsExporter(), MetricsExporter()
    a.on_event("update_accepted", {"round": 1, "device": "d"})
    from prometheus_client import generate_latest

    assert value(served_samples(generate_latest(a.registry).decode()), "fleetlearn_updates_total", result="accepted") == 1
    assert value(served_samples(generate_latest(b.registry).decode()), "fleetlearn_updates_total", result="accepted") == 0


# ------------------------------------------------------------------ a real run, a real Prometheus


@pytest.mark.mosquitto
def test_prometheus_scrapes_a_real_run_and_the_dashboard_names_exist(mosquitto, tmp_path, boston_bundle, boston_shards):
    from fleetlearn.aggregator import Aggregator, AggregatorConfig, RoundPolicy

    shards, test_npz = boston_shards
    port = free_port()
    exporter = MetricsExporter()
    server = exporter.serve("127.0.0.1", port)
    prom = Prometheus(tmp_path, [f"127.0.0.1:{port}"])
    devices = []
    try:
        cfg = AggregatorConfig(
            broker=mosquitto.url,
            state_dir=tmp_path / "agg",
            bundle=boston_bundle,
            fleet=FLEET,
            test_data=test_npz,
            rounds=RoundPolicy(rounds=3, min_devices=2, deadline=60),
        )
        agg = Aggregator(cfg)
        agg.events.listen(exporter.on_event)
        agg.watch_devices = True
        result: list[int] = []
        runner = threading.Thread(target=lambda: result.append(agg.run()))
        runner.start()
        for i, shard in enumerate(shards[:2]):
            c = write_config(tmp_path, mosquitto.url, boston_bundle, shard, device_id=f"dev-{i}")
            devices.append(start_device(c, tmp_path / f"dev-{i}.log", "--max-rounds", "3"))
        runner.join(180)
        assert result == [0], f"aggregator: {result}"
        # Prometheus's own query API, after its scrapes: the last round and the accepted updates.
        assert prom.wait_for('fleetlearn_round{job="fleetlearn"}', lambda v: v == 3) == 3
        assert prom.wait_for('sum(fleetlearn_updates_total{result="accepted"})', lambda v: v >= 6) == 6
        assert prom.wait_for("sum(fleetlearn_devices)", lambda v: v == 2) == 2
        assert prom.scalar('fleetlearn_test_metric{name="test_mse"}') > 0
        assert prom.scalar("fleetlearn_round_duration_seconds_count") == 3
        # The dashboard: every metric its queries select is served by this real exporter, and
        # every query is valid PromQL for the real server.
        served = set(served_samples(scrape(port)))
        for expr in dashboard_exprs():
            names = promql_metric_names(expr)
            assert names and names <= served, f"{expr}: {sorted(names - served)} not served (served: {sorted(served)})"
            q = prom.query(expr.replace("$__rate_interval", "1m").replace("$job", ".*"))
            assert q["status"] == "success", (expr, q)
    finally:
        for p in devices:
            stop_process(p)
        prom.stop()
        server.close()


@pytest.mark.mosquitto
def test_aggregator_cli_serves_metrics_while_it_runs(mosquitto, tmp_path, boston_bundle):
    """`fleetlearn aggregator --metrics-port` through the real CLI, scraped between rounds, with a
    rejected update counted under its fixed reason and a device's status counted by state."""
    import numpy as np

    from fleetlearn.edge_runtime.core.protocol import GlobalModel, Status, Topics, Update
    from tests.peers import Peer
    from tests.procs import AggregatorProcess

    t = Topics("metricscli")
    port = free_port()
    agg = AggregatorProcess(
        tmp_path,
        mosquitto.url,
        "metricscli",
        tmp_path / "agg",
        "--rounds",
        "2",
        "--min-devices",
        "1",
        "--deadline",
        "60",
        "--metrics-port",
        str(port),
        "--metrics-per-device",
        bundle=boston_bundle,
    )
    peer = Peer(mosquitto.url, [t.global_model])
    try:
        _, payload = peer.wait_for(lambda tp, p: tp == t.global_model and bool(p), 30)
        g = GlobalModel.decode(payload)
        peer.publish(t.status("d1"), Status("d1", "training", 1, "", time.time()).encode(), retain=True)
        peer.publish(t.update("d1"), b"not a frame")
        u = Update(g.run_id, 1, "d1", g.model_hash, 10, 1.0, 0.1, "ab" * 16, np.zeros_like(g.weights))
        peer.publish(t.update("d1"), u.encode())
        end = time.monotonic() + 30
        while True:
            s = served_samples(scrape(port))
            if value(s, "fleetlearn_round") == 1 and value(s, "fleetlearn_devices", state="training") == 1:
                break
            assert time.monotonic() < end, scrape(port)
            time.sleep(0.2)
        assert value(s, "fleetlearn_updates_total", result="rejected", reason="malformed") == 1
        assert value(s, "fleetlearn_updates_total", result="accepted") == 1
        assert value(s, "fleetlearn_device_updates_total", device="d1", result="accepted") == 1
        assert value(s, "fleetlearn_open_round") == 2
        assert all(x.labels.get("reason") in (*REJECTION_REASONS, "none") for x in s["fleetlearn_updates_total"])
    finally:
        peer.publish(t.status("d1"), b"", retain=True)
        peer.close()
        agg.stop()


@pytest.mark.mosquitto
def test_monitor_exports_the_device_gauges(mosquitto, tmp_path):
    from fleetlearn.edge_runtime.core.protocol import Status, Topics
    from tests.peers import Peer

    t = Topics("monmetrics")
    peer = Peer(mosquitto.url)
    for dev, state in (("a", "idle"), ("b", "training"), ("c", "offline")):
        peer.publish(t.status(dev), Status(dev, state, 1, "", time.time()).encode(), retain=True)
    port = free_port()
    log = tmp_path / "monitor.log"
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn.cli",
            "monitor",
            "--broker",
            mosquitto.url,
            "--fleet",
            "monmetrics",
            "--json",
            "--metrics-port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
    )
    try:
        wait_port(port, 20)
        end = time.monotonic() + 20
        while True:
            s = served_samples(scrape(port))
            if value(s, "fleetlearn_devices") == 3:
                break
            assert time.monotonic() < end, scrape(port) + log.read_text()
            time.sleep(0.2)
        assert [value(s, "fleetlearn_devices", state=x) for x in ("idle", "training", "offline")] == [1, 1, 1]
        peer.publish(t.status("b"), Status("b", "uploading", 1, "", time.time()).encode(), retain=True)
        end = time.monotonic() + 10
        while value(served_samples(scrape(port)), "fleetlearn_devices", state="uploading") != 1:
            assert time.monotonic() < end
            time.sleep(0.2)
    finally:
        stop_process(proc)
        for dev in "abc":
            peer.publish(t.status(dev), b"", retain=True)
        peer.close()


def test_dp_epsilon_only_when_dp_reports_it_and_counters_from_events():
    from prometheus_client import generate_latest

    e = MetricsExporter()
    rec = {
        "round": 1,
        "run_id": "a" * 32,
        "devices": ["d1", "d2"],
        "accepted": 2,
        "wall_s": 2.5,
        "bytes_in": 100,
        "bytes_out": 40,
        "test_mse": 3.0,
    }
    e.on_event("round_open", {"round": 1, "target_devices": 2})
    e.on_event("round_extended", {"round": 1})
    e.on_event("round_closed", rec)
    s = served_samples(generate_latest(e.registry).decode())
    assert "fleetlearn_dp_epsilon" not in s
    assert value(s, "fleetlearn_deadline_extensions_total") == 1 and value(s, "fleetlearn_bytes_total", direction="in") == 100
    assert value(s, "fleetlearn_round_accepted_updates") == 2 and value(s, "fleetlearn_round_target_devices") == 2
    e.on_event("round_open", {"round": 2, "target_devices": 2})
    e.on_event("round_closed", {**rec, "round": 2, "epsilon": 1.25, "delta": 1e-5})
    s = served_samples(generate_latest(e.registry).decode())
    assert (
        value(s, "fleetlearn_dp_epsilon") == 1.25
        and value(s, "fleetlearn_round") == 2
        and value(s, "fleetlearn_bytes_total", direction="out") == 80
    )
    resumed = MetricsExporter()
    resumed.on_event("round_open", {"round": 7, "target_devices": 1})  # a restart resumes at round 7
    assert value(served_samples(generate_latest(resumed.registry).decode()), "fleetlearn_round") == 6
    # Round 8 opens while round 7 is still being made durable: round 7 is not closed until its
    # round_closed event (which follows its acks, so accepted counters never lag the round gauge).
    resumed.on_event("round_open", {"round": 8, "target_devices": 1})
    assert value(served_samples(generate_latest(resumed.registry).decode()), "fleetlearn_round") == 6
    resumed.on_event("round_closed", {**rec, "round": 7})
    assert value(served_samples(generate_latest(resumed.registry).decode()), "fleetlearn_round") == 7

"""Device health and eligibility. Health readings come from sysfs files faked in a temp dir
(the config's sysfs_root); the end-to-end tests run a real device process on a real broker
with this test as the aggregator peer."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.errors import ConfigError, ProtocolError
from fleetlearn.edge_runtime.core.protocol import Health, Status, Topics, Update
from fleetlearn.edge_runtime.device.config import parse_device_config
from fleetlearn.edge_runtime.device.eligibility import EligibilityConfig, ineligible_reason, parse_eligibility
from fleetlearn.edge_runtime.device.health import HealthReader, cpu_temp_c, power_source
from tests.peers import Peer
from tests.test_device import FLEET, global_frame, start_device, wait_log, write_config

T = Topics(FLEET)


def fake_sysfs(root: Path, zones: dict[str, int] | None = None, supplies: dict[str, dict[str, str]] | None = None) -> Path:
    """root/class/thermal/thermal_zoneN/{type,temp} and root/class/power_supply/NAME/{type,online}."""
    for i, (kind, milli_c) in enumerate((zones or {}).items()):
        z = root / "class" / "thermal" / f"thermal_zone{i}"
        z.mkdir(parents=True, exist_ok=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(f"{milli_c}\n")
    for name, files in (supplies or {}).items():
        d = root / "class" / "power_supply" / name
        d.mkdir(parents=True, exist_ok=True)
        for k, v in files.items():
            (d / k).write_text(v + "\n")
    root.mkdir(parents=True, exist_ok=True)
    return root


def at(hh: int, mm: int) -> time.struct_time:
    return time.struct_time((2026, 1, 1, hh, mm, 0, 3, 1, 0))


# ---------------------------------------------------------------- readings


def test_readings_from_a_faked_board(tmp_path):
    pi = fake_sysfs(tmp_path / "pi", {"cpu-thermal": 61234}, {"rpi-poe": {"type": "Mains", "online": "1"}})
    assert cpu_temp_c(pi) == pytest.approx(61.234) and power_source(pi) == "ac"
    # A laptop: CPU package zone preferred over a hotter unrelated zone; on battery.
    laptop = fake_sysfs(
        tmp_path / "laptop",
        {"acpitz": 90000, "x86_pkg_temp": 55000},
        {"AC": {"type": "Mains", "online": "0"}, "BAT0": {"type": "Battery"}},
    )
    assert cpu_temp_c(laptop) == 55.0 and power_source(laptop) == "battery"
    # Nothing exposed, or garbage: absent, never guessed.
    bare = fake_sysfs(tmp_path / "bare")
    assert cpu_temp_c(bare) is None and power_source(bare) is None
    junk = fake_sysfs(tmp_path / "junk", {"cpu": 0})
    (junk / "class/thermal/thermal_zone0/temp").write_text("hot\n")
    assert cpu_temp_c(junk) is None
    fake_sysfs(junk, {"cpu": 9_999_999})  # 9999 C: a broken sensor, not a reading
    assert cpu_temp_c(junk) is None
    h = HealthReader(tmp_path, bare).read()
    assert h.cpu_temp_c is None and h.power_source is None
    assert h.uptime_s is not None and h.uptime_s >= 0 and h.rss_bytes > 1 << 20 and h.free_disk_bytes > 0
    assert "cpu_temp_c" not in h.to_json() and "power_source" not in h.to_json()


def test_status_health_on_the_wire_is_bounded_and_typed():
    h = Health(uptime_s=12.5, rss_bytes=50_000_000, free_disk_bytes=3 << 30, cpu_temp_c=48.5, power_source="ac")
    st = Status("pi-1", "ineligible", 3, "CPU too hot", 1.0, health=h)
    assert Status.decode(st.encode()) == st
    assert Status.decode(Status("pi-1", "idle").encode()).health is None  # old devices: no health
    partial = json.loads(Status("pi-1", "idle", health=Health(uptime_s=1.0)).encode())
    assert partial["health"] == {"uptime_s": 1.0}  # absent readings are left out, not null-guessed
    base = {"v": 1, "device_id": "pi-1", "state": "idle", "round": 0, "detail": "", "ts": 0}
    assert Status.decode(json.dumps(base).encode()).health is None
    for bad in (
        {"cpu_temp_c": "hot"},
        {"cpu_temp_c": 1e308},
        {"rss_bytes": -1},
        {"rss_bytes": 1.5},
        {"free_disk_bytes": True},
        {"uptime_s": 10**400},
        {"power_source": "nuclear"},
        {"power_source": ["ac"]},
    ):
        with pytest.raises(ProtocolError):
            Status.decode(json.dumps({**base, "health": bad}).encode())
    with pytest.raises(ProtocolError):
        Status.decode(json.dumps({**base, "health": [1, 2]}).encode())
    # Unknown health keys (a newer device) are ignored; null readings are absent.
    assert Status.decode(json.dumps({**base, "health": {"gpu_temp_c": 3, "cpu_temp_c": None}}).encode()).health == Health()


# ---------------------------------------------------------------- rules


def test_time_windows_local_time_and_midnight():
    rules = parse_eligibility({"hours": ["22:00-02:00", "12:00-12:30"]})
    ok = lambda hh, mm: ineligible_reason(rules, Health(), at(hh, mm)) is None  # noqa: E731
    assert ok(22, 0) and ok(23, 59) and ok(0, 0) and ok(1, 59) and ok(12, 0) and ok(12, 29)
    assert not ok(2, 0) and not ok(21, 59) and not ok(12, 30) and not ok(9, 0)
    assert "outside training hours 22:00-02:00, 12:00-12:30 (local time 09:00)" in ineligible_reason(rules, Health(), at(9, 0))
    assert parse_eligibility({"hours": "01:00-05:00,23:00-24:00"}).hours[1].admits(23 * 60 + 59)


def test_rules_and_readings_that_do_not_exist():
    hot = Health(cpu_temp_c=81.0, free_disk_bytes=100 << 20, power_source="battery")
    assert ineligible_reason(EligibilityConfig(), hot) is None  # no rules: always eligible
    assert ineligible_reason(parse_eligibility({"max_cpu_temp_c": 80}), hot) == "CPU at 81.0 C, above max_cpu_temp_c 80"
    assert ineligible_reason(parse_eligibility({"max_cpu_temp_c": 85}), hot) is None
    assert "below min_free_disk_mb 200" in ineligible_reason(parse_eligibility({"min_free_disk_mb": 200}), hot)
    assert ineligible_reason(parse_eligibility({"require_ac_power": True}), hot) == "on battery power, require_ac_power is set"
    # A rule the board cannot check keeps the device from training, with the reason.
    assert "exposes no CPU temperature" in ineligible_reason(parse_eligibility({"max_cpu_temp_c": 80}), Health())
    assert "reports no power supply" in ineligible_reason(parse_eligibility({"require_ac_power": True}), Health())


@pytest.mark.parametrize(
    "table, message",
    [
        ({"hours": "1:00-5:00"}, "is not a time window"),
        ({"hours": ["01:00-05:00", "05:00-05:00"]}, "eligibility.hours[1]"),
        ({"hours": "00:00-24:00"}, "whole day"),
        ({"hours": "23:00-24:30"}, "ends after 24:00"),
        ({"hours": 3}, "must be a window string or a list"),
        ({"max_cpu_temp_c": "70"}, "eligibility.max_cpu_temp_c' must be a number"),
        ({"min_free_disk_mb": -1}, "min_free_disk_mb' must be a number"),
        ({"require_ac_power": "yes"}, "require_ac_power' must be true or false"),
        ({"check_interval_s": 0}, "check_interval_s' must be a number"),
        ({"max_temp": 70}, "unknown key 'eligibility.max_temp'"),
    ],
)
def test_eligibility_config_is_strict_with_one_line_errors(table, message):
    base = {"device_id": "d", "fleet": "f", "broker": "mqtt://h:1883", "bundle": "b", "data": "d", "state_dir": "s"}
    with pytest.raises(ConfigError) as e:
        parse_device_config({**base, "eligibility": table})
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'eligibility' must be a table"):
        parse_device_config({**base, "eligibility": "always"})


# ---------------------------------------------------------------- a real device


def wait_status(peer: Peer, state: str, round_: int | None = None, timeout: float = 60.0, device: str = "dev-0") -> Status:
    deadline = time.monotonic() + timeout
    while True:
        _, payload = peer.wait_for(lambda t, p: t == T.status(device) and bool(p), timeout=max(0.1, deadline - time.monotonic()))
        st = Status.decode(payload)
        if st.state == state and round_ in (None, st.round):
            return st


def eligible_config(tmp_path: Path, url: str, bundle: Path, data: Path, sysfs: Path, device_id: str = "dev-0", **rules) -> Path:
    cfg = write_config(tmp_path, url, bundle, data, device_id=device_id)
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in rules.items())
    text = cfg.read_text().replace("\n[training]", f'\nsysfs_root = "{sysfs}"\n\n[training]')
    cfg.write_text(text + f"\n[eligibility]\n{body}")
    return cfg


def test_hot_device_reports_ineligible_sends_nothing_and_resumes_when_cool(mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, _ = boston_shards
    sysfs = fake_sysfs(tmp_path / "sys", {"cpu-thermal": 85000}, {"mains": {"type": "Mains", "online": "1"}})
    cfg = eligible_config(
        tmp_path, mosquitto.url, boston_bundle, shards[0], sysfs, max_cpu_temp_c=70, require_ac_power=True, check_interval_s=0.2
    )
    peer = Peer(mosquitto.url, [T.all_updates, T.all_status])
    peer.publish(T.global_model, global_frame(boston_bundle, secrets.token_hex(16), 1), retain=True)
    log = tmp_path / "device.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        st = wait_status(peer, "ineligible", 1)  # (it may say so at round 0 first, before the global arrives)
        assert st.detail == "CPU at 85.0 C, above max_cpu_temp_c 70"
        assert (
            st.health.cpu_temp_c == 85.0
            and st.health.power_source == "ac"
            and st.health.rss_bytes > 0
            and st.health.free_disk_bytes > 0
        )
        wait_log(log, "event=ineligible device=dev-0 round=1")
        # Ineligible for a while (many checks): no update leaves the device.
        time.sleep(2.0)
        assert not [t for t, _ in peer.drain() if t == T.update("dev-0")]
        assert proc.poll() is None
        # It cools down: the device trains on the round it held and delivers the update.
        (sysfs / "class/thermal/thermal_zone0/temp").write_text("52000\n")
        _, payload = peer.wait_for(lambda t, p: t == T.update("dev-0"), timeout=60)
        update = Update.decode(payload, load_bundle(boston_bundle).num_params)
        assert update.round == 1 and update.device_id == "dev-0"
        wait_log(log, "event=eligible device=dev-0")
    finally:
        proc.terminate()
        proc.wait(15)
        peer.close()


def test_device_outside_its_hours_or_on_battery_reports_ineligible_while_idle(mosquitto, tmp_path, boston_bundle, boston_shards):
    """No round needed: an idle device shows the rule that keeps it out, and that it comes back."""
    shards, _ = boston_shards
    sysfs = fake_sysfs(tmp_path / "sys", {}, {"AC": {"type": "Mains", "online": "0"}, "BAT0": {"type": "Battery"}})
    cfg = eligible_config(tmp_path, mosquitto.url, boston_bundle, shards[0], sysfs, require_ac_power=True, check_interval_s=0.2)
    peer = Peer(mosquitto.url, [T.all_status])
    proc = start_device(cfg, tmp_path / "device.log")
    try:
        st = wait_status(peer, "ineligible")
        assert st.detail == "on battery power, require_ac_power is set" and st.health.power_source == "battery"
        assert st.health.cpu_temp_c is None  # no thermal zone on this board: absent, not guessed
        (sysfs / "class/power_supply/AC/online").write_text("1\n")
        st = wait_status(peer, "idle")
        assert st.health.power_source == "ac"
    finally:
        proc.terminate()
        proc.wait(15)
        peer.close()


def test_aggregator_treats_an_ineligible_device_as_unavailable_not_failed(mosquitto, tmp_path, boston_bundle, boston_shards):
    """A real aggregator, one eligible and one overheated device: each round closes at its
    deadline with the eligible device's update; nothing is rejected, the run succeeds."""
    from tests.procs import AggregatorProcess

    shards, _ = boston_shards
    state = tmp_path / "agg"
    agg = AggregatorProcess(
        tmp_path,
        mosquitto.url,
        FLEET,
        state,
        "--rounds",
        "2",
        "--min-devices",
        "1",
        "--target-devices",
        "2",
        "--deadline",
        "3",
        bundle=boston_bundle,
    )
    cool = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0], device_id="dev-0")
    hot_sys = fake_sysfs(tmp_path / "hot-sys", {"cpu-thermal": 95000})
    hot = eligible_config(
        tmp_path, mosquitto.url, boston_bundle, shards[1], hot_sys, device_id="dev-1", max_cpu_temp_c=70, check_interval_s=0.2
    )
    peer = Peer(mosquitto.url, [T.status("dev-1")])
    procs = [start_device(cool, tmp_path / "dev-0.log", "--max-rounds", "2"), start_device(hot, tmp_path / "dev-1.log")]
    try:
        assert agg.wait(120) == 0, agg.text()[-3000:]
        assert wait_status(peer, "ineligible", device="dev-1").detail == "CPU at 95.0 C, above max_cpu_temp_c 70"
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
        agg.stop()
        peer.close()
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["devices"] == ["dev-0"] and r["rejected"] == 0 for r in rounds)
    assert "dev-1" not in agg.text()  # the aggregator never heard from it: no failure, no rejection
    assert "update_sent" not in (tmp_path / "dev-1.log").read_text()


def test_gate_holds_the_newest_refused_round_and_forgets_it_once_a_round_trains():
    from types import SimpleNamespace

    from fleetlearn.edge_runtime.device.eligibility import EligibilityGate

    temp = {"c": 90.0}
    gate = EligibilityGate(
        parse_eligibility({"max_cpu_temp_c": 70, "check_interval_s": 5}), lambda: Health(cpu_temp_c=temp["c"]), 60
    )
    g1, g2, g3 = (SimpleNamespace(round=r) for r in (1, 2, 3))
    assert gate.refuse(g1) and gate.parked is g1
    assert gate.refuse(g2) and gate.parked is g2  # a newer round replaces the held one
    assert gate.verdict("ineligible", "CPU at 90.0 C, above max_cpu_temp_c 70") is None  # same reason: nothing to say
    temp["c"] = 95.0
    assert gate.verdict("ineligible", "CPU at 90.0 C, above max_cpu_temp_c 70") == "CPU at 95.0 C, above max_cpu_temp_c 70"
    temp["c"] = 50.0
    assert gate.verdict("ineligible", "x") == "eligible" and gate.verdict("idle", "") is None
    assert gate.verdict("training", "") is None  # only idle or ineligible devices are judged between events
    # Round 3 arrives and passes the rules: round 2 must never be trained afterwards.
    assert gate.refuse(g3) is None and gate.take() is None
    temp["c"] = 90.0
    gate.refuse(g3)
    gate.drop_until(3)  # its round closed
    assert gate.take() is None

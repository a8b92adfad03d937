"""The monitor's state model, decoding and rendering, without a broker or a terminal."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, RoundMetrics, RoundState, Status, Topics, Update, encode_json
from fleetlearn.monitor_messages import DeviceForgotten, GlobalSeen, UploadSeen, decode_message
from fleetlearn.monitor_state import FleetState
from fleetlearn.monitor_view import render, sparkline

RUN = "a" * 32
RUN2 = "b" * 32
T = Topics("lab")


def rs(round_: int, state: str, accepted: int = 0, run: str = RUN) -> RoundState:
    return RoundState(
        run, round_, state, total_rounds=5, deadline=1000.0 + round_ * 60, min_devices=1, target_devices=3, accepted=accepted
    )


def kinds(events) -> list[str]:
    return [e.event for e in events]


def test_round_events_only_on_change():
    s = FleetState("lab")
    assert kinds(s.apply(rs(1, "open"), 1.0)) == ["run", "round"]
    # The same retained message, delivered again after a reconnect: nothing changed.
    assert s.apply(rs(1, "open"), 2.0) == []
    ev = s.apply(rs(1, "open", accepted=1), 3.0)
    assert kinds(ev) == ["round"] and ev[0].to_json()["accepted"] == 1
    assert s.current_round().seconds_left(1000.0) == pytest.approx(60.0)
    s.apply(rs(1, "closed", accepted=2), 4.0)
    s.apply(rs(2, "open"), 5.0)
    assert s.current_round().round == 2
    assert s.rounds[1].seconds_left(5.0) is None


def test_late_offline_and_uploaded():
    s = FleetState("lab")
    s.apply(rs(1, "open"), 1.0)
    for dev, state in (("d1", "training"), ("d2", "training"), ("d3", "training")):
        s.apply(Status(dev, state, 1), 1.0)
    ev = s.apply(UploadSeen("d1", RUN, 1, 100), 2.0)
    assert ev[0].to_json() == {"event": "upload", "ts": 2.0, "device_id": "d1", "round": 1, "bytes": 100, "late": False}
    assert s.apply(UploadSeen("d1", RUN, 1, 100), 2.5) == []  # a re-send is not a second upload
    off = s.apply(Status("d3", "offline", 1, "connection lost (last will)"), 3.0)
    assert off[0].to_json()["state"] == "offline" and off[0].to_json()["previous"] == "training"
    c = s.counts()
    assert (c.total, c.online, c.training, c.uploaded, c.offline) == (
        3,
        2,
        2,
        1,
        1,
    )  # d1 reports "training" until its next status
    ev = s.apply(rs(1, "closed", accepted=1), 4.0)
    # d2 was online and had not uploaded: late. d3 was offline: offline, not late.
    assert [(e.event, e.fields.get("device_id")) for e in ev] == [("round", None), ("late", "d2")]
    assert s.counts().late == 1 and s.late_round == 1
    # d2's update arrives after the close: an upload, and late.
    ev = s.apply(UploadSeen("d2", RUN, 1, 100), 5.0)
    assert ev[0].fields["late"] is True and len(ev) == 1  # already judged late: no second late event
    assert s.devices["d2"].late_rounds == 1


def test_late_for_rounds_never_seen_open_is_not_judged():
    s = FleetState("lab")
    s.apply(Status("d1", "idle", 3), 1.0)
    ev = s.apply(rs(3, "closed", accepted=2), 1.0)  # the monitor started after round 3 closed
    assert "late" not in kinds(ev)
    assert s.late_round is None


def test_metrics_correct_a_late_judgement_and_feed_the_trend():
    s = FleetState("lab")
    s.apply(rs(1, "open"), 1.0)
    s.apply(Status("d1", "training", 1), 1.0)
    s.apply(rs(1, "closed", accepted=1), 2.0)
    assert s.rounds[1].late == {"d1"}
    ev = s.apply(
        RoundMetrics.from_doc({"round": 1, "run_id": RUN, "devices": ["d1"], "samples": 10, "train_loss": 2.0, "test_mse": 9.0}),
        3.0,
    )
    assert [(e.event, e.fields.get("late")) for e in ev] == [("late", False), ("metrics", None)]
    assert ev[1].to_json()["test_mse"] == 9.0 and ev[1].to_json()["test_metric"] == "test_mse"
    assert s.rounds[1].late == set() and s.devices["d1"].late_rounds == 0
    s.apply(RoundMetrics.from_doc({"round": 2, "run_id": RUN, "devices": ["d1"], "test_mse": 4.0}), 4.0)
    assert s.trend() == ("test_mse", [9.0, 4.0])


def test_new_run_forgets_old_rounds_and_old_metrics_are_ignored():
    s = FleetState("lab")
    s.apply(rs(7, "closed"), 1.0)
    ev = s.apply(rs(1, "open", run=RUN2), 2.0)
    assert kinds(ev) == ["run", "round"] and list(s.rounds) == [1]
    assert s.apply(RoundMetrics.from_doc({"round": 7, "run_id": RUN, "test_mse": 1.0}), 3.0) == []
    assert s.apply(UploadSeen("d1", RUN, 7, 10), 3.0) == []


def test_link_events_and_ack_and_forget():
    s = FleetState("lab")
    assert kinds(s.set_connected(1.0)) == ["connected"]
    assert kinds(s.set_disconnected("connection lost", 2.0)) == ["disconnected"]
    assert s.set_disconnected("again", 2.5) == []
    assert kinds(s.set_link_error("refused", 3.0)) == ["link_error"]
    assert s.set_link_error("refused", 3.5) == []
    s.apply(rs(1, "open"), 4.0)
    ev = s.apply(Ack(RUN, 1, "d9", "f" * 32, False, "late"), 5.0)
    assert ev[0].to_json()["accepted"] is False and "d9" in s.rounds[1].uploaded
    s.apply(Status("d9", "idle", 1), 5.0)
    assert kinds(s.apply(DeviceForgotten("d9"), 6.0)) == ["device"] and "d9" not in s.devices


def test_decode_message_routes_and_rejects():
    assert decode_message(T, T.round, rs(1, "open").encode()) == rs(1, "open")
    st = decode_message(T, T.status("d1"), Status("d1", "idle", 0).encode())
    assert isinstance(st, Status) and st.state == "idle"
    with pytest.raises(ProtocolError):
        decode_message(T, T.status("d2"), Status("d1", "idle", 0).encode())  # names another device
    with pytest.raises(ProtocolError):
        decode_message(T, T.round, b'{"v":1,"state":"open"}')
    with pytest.raises(ProtocolError):
        decode_message(T, T.metrics, encode_json({"devices": []}))  # no round
    assert decode_message(T, T.round, b"") is None
    assert decode_message(T, T.status("d1"), b"") == DeviceForgotten("d1")
    up = Update(RUN, 2, "d1", "c" * 64, 10, 1.5, 0.1, "e" * 32, np.zeros(4, np.float32)).encode()
    assert decode_message(T, T.update("d1"), up) == UploadSeen("d1", RUN, 2, len(up))
    with pytest.raises(ProtocolError):
        decode_message(T, T.update("d2"), up)
    with pytest.raises(ProtocolError):
        decode_message(T, T.update("d1"), up[:-1])  # truncated
    g = GlobalModel(RUN, 3, "c" * 64, np.ones(4, np.float32), total_rounds=5, deadline=99.0).encode()
    assert decode_message(T, T.global_model, g) == GlobalSeen(RUN, 3, "c" * 64, True, 5, 99.0)
    ack = Ack(RUN, 1, "d1", "e" * 32, True).encode()
    assert decode_message(T, T.ack("d1"), ack).accepted is True
    assert decode_message(T, "fleetlearn/other/round", rs(1, "open").encode()) is None


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([3.0, 3.0]) == "▅▅"
    assert sparkline([0.0, 1.0, 2.0, 7.0]) == "▁▂▃█"
    assert len(sparkline(range(100), width=30)) == 30


def test_render_to_a_string_console():
    s = FleetState("lab")
    s.set_connected(0.0)
    for r in range(1, 4):
        s.apply(rs(r, "open"), float(r))
        s.apply(Status("d1", "training", r), float(r))
        s.apply(UploadSeen("d1", RUN, r, 10), float(r))
        s.apply(rs(r, "closed", accepted=1), float(r))
        s.apply(
            RoundMetrics.from_doc(
                {
                    "round": r,
                    "devices": ["d1"],
                    "samples": 5,
                    "train_loss": 1.0 / r,
                    "test_accuracy": 0.5 + r / 10,
                    "wall_s": 1.0,
                    "bytes_in": 2048,
                    "bytes_out": 10,
                }
            ),
            float(r),
        )
    s.apply(Status("d2", "offline", 3, "connection lost (last will)"), 4.0)
    console = Console(width=160, height=50, record=True, color_system=None)
    console.print(render(s, 5.0, "mqtt://127.0.0.1:1883", rounds=5))
    text = console.export_text()
    assert "round 3/5" in text and "test_accuracy" in text and "offline 1" in text
    assert "connection lost (last will)" in text and "2.0 KB" in text


def test_a_stray_upload_does_not_become_the_current_round():
    s = FleetState("lab")
    s.apply(rs(2, "open"), 1.0)
    s.apply(UploadSeen("d1", RUN, 99, 10), 2.0)
    assert s.current_round().round == 2
    assert [v.round for v in s.recent_rounds(10)] == [2]


def test_acks_stand_in_for_updates_without_the_update_subscription():
    s = FleetState("lab")
    s.apply(rs(1, "open"), 1.0)
    s.apply(Status("d1", "training", 1), 1.0)
    s.apply(Status("d2", "training", 1), 1.0)
    s.apply(Ack(RUN, 1, "d1", "e" * 32, True), 2.0)
    assert s.counts().uploaded == 1
    ev = s.apply(rs(1, "closed", accepted=1), 3.0)
    assert [(e.event, e.fields.get("device_id")) for e in ev] == [("round", None), ("late", "d2")]
    # d2's update was answered after the close: it stays late, once.
    ev = s.apply(Ack(RUN, 1, "d2", "e" * 32, False, "round 1 is closed"), 4.0)
    assert kinds(ev) == ["ack"] and s.devices["d2"].late_rounds == 1


def test_the_end_of_run_marker_is_not_a_round():
    s = FleetState("lab")
    s.apply(rs(5, "open"), 1.0)
    s.apply(rs(5, "closed"), 2.0)
    s.apply(rs(6, "finished"), 3.0)
    assert [v.round for v in s.recent_rounds(10)] == [5]
    console = Console(width=120, height=30, record=True, color_system=None)
    console.print(render(s, 4.0, "mqtt://x:1883"))
    assert "run finished after 5 rounds" in console.export_text()


def test_health_readings_and_ineligible_devices_are_shown():
    from fleetlearn.edge_runtime.core.protocol import Health

    s = FleetState("lab")
    s.set_connected(0.0)
    s.apply(rs(1, "open"), 1.0)
    hot = Health(uptime_s=7200.0, rss_bytes=48 << 20, free_disk_bytes=3 << 30, cpu_temp_c=81.5, power_source="ac")
    events = s.apply(Status("pi-1", "ineligible", 1, "CPU at 81.5 C, above max_cpu_temp_c 70", health=hot), 2.0)
    assert events[0].to_json()["health"] == {
        "uptime_s": 7200.0,
        "rss_bytes": 48 << 20,
        "free_disk_bytes": 3 << 30,
        "cpu_temp_c": 81.5,
        "power_source": "ac",
    }
    s.apply(Status("pi-2", "idle", 1, health=Health(uptime_s=5.0)), 2.0)  # no thermal zone, no supply
    assert s.apply(Status("pi-2", "idle", 1, health=Health(uptime_s=65.0)), 3.0) == []  # a heartbeat: no event
    s.apply(Status("pi-3", "offline", 1, "connection lost (last will)"), 3.0)
    assert s.counts().ineligible == 1
    console = Console(width=200, height=50, record=True, color_system=None)
    console.print(render(s, 5.0, "mqtt://127.0.0.1:1883", rounds=5))
    text = console.export_text()
    assert "ineligible 1" in text and "CPU at 81.5 C" in text
    assert "81.5C ac rss 48.0 MB disk 3.0 GB up 2.0h" in text
    assert "up 1m" in text and "C ac" not in text.split("pi-2")[1].splitlines()[0]

"""One writer per fleet: the leader lease on a real mosquitto with real aggregator processes.

A SIGKILLed leader's Last Will may or may not reach the broker: when its host dies, nobody
closes its TCP connection and the broker waits for the keepalive. Both cases are tested; the
second through a TCP relay that keeps the broker side of a dead client's connections open."""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Lease, LeaseView, Topics, encode_probe
from tests.conftest import stop_process
from tests.peers import Peer
from tests.procs import AggregatorProcess
from tests.test_device import global_frame, start_device, wait_log, write_config

FLEET = "leadtest"
T = Topics(FLEET)


def lease(state="held", run_id="a" * 32, token="b" * 32, holder="h:1", claimed=100.0, issued=100.0, expires=130.0) -> Lease:
    return Lease(state, run_id, token, holder, claimed, issued, expires)


# ------------------------------------------------------------------ the message and the view


def test_lease_round_trip_and_hostile_input():
    one = lease()
    assert Lease.decode(one.encode()) == one
    good = json.loads(one.encode())
    bad = [
        {**good, "state": "mine"},
        {**good, "run_id": "A" * 32},
        {**good, "token": "b" * 31},
        {**good, "holder": "a b"},
        {**good, "holder": "x" * 200},
        {**good, "expires": 50.0},
        {**good, "expires": 1e9},
        {**good, "issued": "soon"},
        {**good, "v": 2},
        {k: v for k, v in good.items() if k != "claimed"},
    ]
    for doc in bad:
        with pytest.raises(ProtocolError):
            Lease.decode(json.dumps(doc).encode())
    for raw in (b"\xff\xfe", b"[]", b'{"v":1,"state":"held","issued":NaN}', b"{" * 5000, b"x" * 5000):
        with pytest.raises(ProtocolError):
            Lease.decode(raw)


def test_lease_view_dedupes_ignores_stale_wills_and_superseded_renewals():
    v = LeaseView()
    assert v.allows("c" * 32)  # no lease seen yet: an older aggregator still works
    a = lease(run_id="1" * 32, token="a" * 32, claimed=100)
    assert v.observe(a.encode()) == a and v.allows("1" * 32) and not v.allows("2" * 32)
    assert v.observe(a.encode()) is None  # a retained message delivered twice
    assert v.observe(encode_probe("f" * 32)) is None and v.observe(b"") is None
    b = lease(run_id="2" * 32, token="b" * 32, claimed=200, issued=200, expires=230)
    assert v.observe(b.encode()) == b and v.allows("2" * 32)  # a takeover: the later claim
    assert (
        v.observe(lease("released", run_id="1" * 32, token="a" * 32, issued=240, expires=240).encode()) is None
    )  # a's late Last Will
    assert (
        v.observe(lease(run_id="1" * 32, token="a" * 32, claimed=100, issued=250, expires=280).encode()) is None
    )  # a zombie renewal
    assert v.current == b
    released = lease("released", run_id="2" * 32, token="b" * 32, claimed=200, issued=260, expires=260)
    assert v.observe(released.encode()) == released and v.allows("2" * 32)  # the run stays the fleet's until the next claim


# ------------------------------------------------------------------ a relay that can play dead


class Relay:
    """TCP relay to the broker. `play_dead()`: the client side is gone, but the broker side of
    every connection stays open and silent, as when a host loses power."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.dead = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            self.held += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client_side: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data or self.dead.is_set():
                if not self.dead.is_set():
                    dst.close()
                return  # dead: leave the other side open and silent
            try:
                dst.sendall(data)
            except OSError:
                return

    def play_dead(self) -> None:
        self.dead.set()

    def close(self) -> None:
        self.server.close()
        for s in self.held:
            try:
                s.close()
            except OSError:
                pass


# ------------------------------------------------------------------ real aggregators


def agg(tmp: Path, url: str, name: str, bundle: Path, *extra: str) -> AggregatorProcess:
    return AggregatorProcess(
        tmp,
        url,
        FLEET,
        tmp / f"state-{name}",
        "--rounds",
        "2",
        "--min-devices",
        "1",
        "--deadline",
        "120",
        *extra,
        bundle=bundle,
        name=name,
    )


def wait_text(proc: AggregatorProcess, needle: str, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    while needle not in proc.text():
        assert proc.proc.poll() is None or needle in proc.text(), f"exited {proc.proc.returncode}:\n{proc.text()[-3000:]}"
        assert time.monotonic() < end, f"{needle!r} not logged:\n{proc.text()[-3000:]}"
        time.sleep(0.1)
    return proc.text()


def retained_lease(url: str) -> Lease:
    peer = Peer(url, [T.leader])
    try:
        _, payload = peer.wait_for(lambda t, p: t == T.leader and bool(p) and b'"probe"' not in p, 10)
        return Lease.decode(payload)
    finally:
        peer.close()


def error_line(proc: AggregatorProcess) -> str:
    lines = [ln for ln in proc.text().splitlines() if ln.startswith("fleetlearn aggregator: error:")]
    assert len(lines) == 1, proc.text()[-3000:]
    return lines[0]


@pytest.mark.mosquitto
def test_a_second_aggregator_exits_2_naming_the_leader_and_kicks_nobody_off(mosquitto, tmp_path, boston_bundle):
    a = agg(tmp_path, mosquitto.url, "a", boston_bundle)
    try:
        wait_text(a, "event=round_open")
        held = retained_lease(mosquitto.url)
        assert held.state == "held" and held.holder.endswith(f":{a.proc.pid}")
        b = agg(tmp_path, mosquitto.url, "b", boston_bundle)
        assert b.wait(30) == 2
        line = error_line(b)
        assert f":{a.proc.pid}" in line and f"run {held.run_id[:8]}" in line and "--takeover" in line
        b2 = agg(tmp_path, mosquitto.url, "b2", boston_bundle, "--takeover")  # a valid lease is never taken
        assert b2.wait(30) == 2 and f":{a.proc.pid}" in error_line(b2)
        assert "event=round_open" not in b.text() and "bundle_published" not in b.text()
        time.sleep(0.5)
        ids = re.findall(r"event=mqtt_connected client=(\S+)", a.text())
        main = [i for i in ids if "-lease-" not in i and not re.search(r"-r[0-9a-f]{8}$", i)]
        assert main == [f"fleetlearn-aggregator-{FLEET}-{held.run_id[:8]}"], ids  # connected once: nobody kicked it off
        assert a.proc.poll() is None and "mqtt_disconnected" not in a.text()
    finally:
        a.stop()
    assert retained_lease(mosquitto.url).state == "released"  # a clean stop releases the fleet


@pytest.mark.mosquitto
def test_sigkilled_leader_whose_last_will_releases_the_fleet(mosquitto, tmp_path, boston_bundle):
    a = agg(tmp_path, mosquitto.url, "a", boston_bundle)
    b = None
    try:
        wait_text(a, "event=round_open")
        token = retained_lease(mosquitto.url).token
        a.kill9()  # the kernel closes its sockets: the broker publishes the Last Will at once
        released = retained_lease(mosquitto.url)
        assert released.state == "released" and released.token == token
        b = agg(tmp_path, mosquitto.url, "b", boston_bundle)
        wait_text(b, "event=round_open")
        assert retained_lease(mosquitto.url).holder.endswith(f":{b.proc.pid}")
    finally:
        a.stop()
        if b is not None:
            b.stop()


@pytest.mark.mosquitto
def test_sigkilled_leader_without_a_will_is_taken_over_after_expiry(mosquitto, tmp_path, boston_bundle, boston_shards):
    """The planned failover of docs/operations-service.md: the leader is gone but its lease is
    not released; a replacement with --takeover takes the fleet once the lease expired, devices
    follow the new run, and the old leader's late Last Will does not undo the takeover."""
    relay = Relay(mosquitto.port)
    a = agg(tmp_path, f"mqtt://127.0.0.1:{relay.port}", "a", boston_bundle, "--lease-ttl", "10")
    procs: list = []
    try:
        wait_text(a, "event=round_open")
        old = retained_lease(mosquitto.url)
        relay.play_dead()
        a.kill9()
        time.sleep(0.5)
        old = retained_lease(mosquitto.url)  # its last renewal
        assert old.state == "held" and old.holder.endswith(
            f":{a.proc.pid}"
        )  # no will: the broker still sees the leader connected
        early = agg(tmp_path, mosquitto.url, "early", boston_bundle, "--takeover")
        assert early.wait(30) == 2 and "lease valid for" in error_line(early)
        time.sleep(max(0.0, old.expires - time.time()) + 0.5)
        plain = agg(tmp_path, mosquitto.url, "plain", boston_bundle)  # another state dir: no restart of a's run
        assert plain.wait(30) == 2 and "expired" in error_line(plain) and "--takeover" in error_line(plain)
        b = agg(tmp_path, mosquitto.url, "b", boston_bundle, "--takeover")
        procs.append(b)
        wait_text(b, "event=fleet_takeover")
        wait_text(b, "event=round_open")
        new = retained_lease(mosquitto.url)
        assert new.holder.endswith(f":{b.proc.pid}") and new.run_id != old.run_id
        # A device follows the new leader's run, and trains for it.
        shards, _ = boston_shards
        cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0], device_id="dev-0")
        cfg.write_text(cfg.read_text().replace('fleet = "devtest"', f'fleet = "{FLEET}"'))
        dev_log = tmp_path / "dev-0.log"
        procs.append(start_device(cfg, dev_log, "--max-rounds", "1"))
        wait_text(b, "event=update_accepted")
        # The dead leader's connections finally close: its Last Will releases a lease it no
        # longer holds; the leader renews its own at once.
        relay.close()
        end = time.monotonic() + 10
        while True:
            cur = retained_lease(mosquitto.url)
            if cur.token == new.token and cur.state == "held" and cur.issued > new.issued:
                break
            assert time.monotonic() < end, cur
            time.sleep(0.3)
        assert b.proc.poll() is None
    finally:
        relay.close()
        a.stop()
        for p in procs:
            p.stop() if isinstance(p, AggregatorProcess) else stop_process(p)


@pytest.mark.mosquitto
def test_a_leader_whose_fleet_was_taken_over_stops_with_exit_2(mosquitto, tmp_path, boston_bundle):
    """A zombie (it lost its lease while away) learns of the takeover and stops writing."""
    a = agg(tmp_path, mosquitto.url, "a", boston_bundle)
    peer = Peer(mosquitto.url)
    try:
        wait_text(a, "event=round_open")
        old = retained_lease(mosquitto.url)
        now = time.time()
        usurper = Lease("held", secrets.token_hex(16), secrets.token_hex(16), "other-host:1", now, now, now + 30)
        peer.publish(T.leader, usurper.encode(), retain=True)
        assert a.wait(30) == 2
        assert "taken over by other-host:1" in error_line(a)
        assert retained_lease(mosquitto.url) == usurper  # the loser neither renewed nor released it
        assert old.token != usurper.token
    finally:
        peer.publish(T.leader, b"", retain=True)
        peer.close()
        a.stop()


@pytest.mark.mosquitto
def test_device_ignores_rounds_of_a_run_that_is_not_the_leaders(mosquitto, tmp_path, boston_bundle, boston_shards):
    from fleetlearn.edge_runtime.core.protocol import Topics as Tp
    from tests.conftest import stop_process
    from tests.test_device import FLEET as DEV_FLEET

    t = Tp(DEV_FLEET)
    leader_run, rogue_run = secrets.token_hex(16), secrets.token_hex(16)
    now = time.time()
    peer = Peer(mosquitto.url, [t.update("dev-0")])
    peer.publish(t.leader, Lease("held", leader_run, secrets.token_hex(16), "h:1", now, now, now + 60).encode(), retain=True)
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, boston_shards[0][0])
    log = tmp_path / "dev.log"
    proc = start_device(cfg, log, "--max-rounds", "1")
    try:
        wait_log(log, "event=leader")
        peer.publish(t.global_model, global_frame(boston_bundle, rogue_run, 1), retain=True)
        wait_log(log, "not the leader's run")
        assert "update_sent" not in log.read_text()
        peer.publish(t.global_model, global_frame(boston_bundle, leader_run, 1), retain=True)
        topic, payload = peer.wait_for(lambda tp, p: tp == t.update("dev-0"), 60)
        from fleetlearn.edge_runtime.core.protocol import UpdateHeader

        assert UpdateHeader.peek(payload).run_id == leader_run
    finally:
        stop_process(proc)
        for topic in (t.leader, t.global_model):
            peer.publish(topic, b"", retain=True)
        peer.close()

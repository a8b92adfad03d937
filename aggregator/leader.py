"""One writer per fleet: the aggregator claims the fleet's leader lease before it publishes
anything, renews it while it runs, and releases it when it stops (or its Last Will does).

    keeper = LeaseKeeper(link_options, topics, run_id, LeasePolicy(ttl=30), on_lost=callback)
    keeper.claim()        # LeaderError (exit 2, names the holder) when another aggregator leads
    ...                   # the run; on_lost(reason) is called if another holder wins later
    keeper.release()      # the retained lease says "released", then a clean disconnect

The protocol (edge_runtime/core/protocol/lease.py has the message and its rules):
1. Read. A short-lived connection without a Last Will subscribes to `leader` and publishes a
   non-retained probe there; once the probe comes back, the retained lease (if any) has
   arrived before it. No broker session is relied on: the read is a round trip.
2. Decide. No lease or a released one: the fleet is free. A held lease that has not expired:
   LeaderError naming the holder. An expired one: taken with --takeover, or without it when
   it is this run's own lease from this host (a restart after a crash, e.g. by systemd).
3. Claim. A second connection, whose Last Will is our release, publishes the held lease
   (retained) and watches the topic for `settle` seconds: two aggregators that read "free" at
   once both claim, and the later claim wins on every reader (Lease.beats); the loser exits 2
   before it published anything else.
4. Hold. A thread renews the lease every ttl/3 and after each reconnect (after a read barrier,
   so a zombie that lost the fleet while away learns it before writing). A foreign held lease
   that beats ours ends the run (on_lost); a foreign release or an older holder's renewal is
   answered by renewing ours at once (it overwrote the retained lease).
The lease is never in the main link's republish set: only this keeper writes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetlearn.aggregator.events import Events
from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.mqtt import LinkOptions, MqttLink
from fleetlearn.edge_runtime.core.protocol import Lease, LeaseView, Topics, encode_probe, probe_token


class LeaderError(UsageError):
    """Another aggregator leads the fleet (or won it while we claimed)."""


@dataclass(frozen=True)
class LeasePolicy:
    ttl: float = 30.0  # a held lease lapses this long after its last renewal
    takeover: bool = False  # take a fleet whose lease expired (planned failover)
    settle: float = 1.0  # after claiming, watch this long for a competing claim
    barrier_timeout: float = 10.0

    def validate(self) -> None:
        if not 2.0 <= self.ttl <= 3600:
            raise UsageError(f"--lease-ttl must be in [2, 3600] seconds, got {self.ttl:g}")


def holder_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100].strip("-.") or "host"
    return f"{host}:{os.getpid()}"


class LeaseKeeper:
    def __init__(
        self,
        opts: LinkOptions,
        topics: Topics,
        run_id: str,
        policy: LeasePolicy,
        events: Events,
        on_lost: Callable[[str], None],
        connect_timeout: float = 30.0,
    ):
        self.opts = opts
        self.topics = topics
        self.run_id = run_id
        self.policy = policy
        self.events = events
        self.on_lost = on_lost
        self.connect_timeout = connect_timeout
        self.token = secrets.token_hex(16)
        self.holder = holder_name()
        self.claimed_at = 0.0
        self.lost = ""  # why we lost the fleet ("" while we hold it or before the claim)
        self._held = False
        self._lock = threading.Lock()
        self._view = LeaseView()
        self._probes: dict[str, threading.Event] = {}
        self._kick = threading.Event()  # renew now (a reconnect, or a foreign write to the topic)
        self._reconnected = False
        self._stop = threading.Event()
        self._link: MqttLink | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ claim

    def claim(self) -> None:
        current = self._read()
        now = time.time()
        fleet = self.topics.fleet
        if current is not None and current.state == "held":
            if current.held_at(now):
                raise LeaderError(
                    f"fleet {fleet} is led by {current.describe()}, lease valid for {current.expires - now:.0f}s more; "
                    "stop that aggregator, or start this one with --takeover once its lease has expired"
                )
            own_restart = current.run_id == self.run_id and current.holder.rsplit(":", 1)[0] == self.holder.rsplit(":", 1)[0]
            if not (self.policy.takeover or own_restart):
                raise LeaderError(
                    f"fleet {fleet}: the lease of {current.describe()} expired {now - current.expires:.0f}s ago "
                    "without a release; make sure it is stopped, then start with --takeover"
                )
            self.events.log(
                "fleet_takeover",
                None,
                level=logging.WARNING,
                previous=current.holder,
                previous_run=current.run_id[:8],
                expired_s=round(now - current.expires, 1),
                reason="--takeover" if self.policy.takeover else "this run's own lease (restart)",
            )
        self._open_holder_link()
        self.claimed_at = time.time()
        self._publish("held")
        if not self._barrier():
            raise LeaderError(f"fleet {fleet}: no answer from the broker while claiming the lease")
        time.sleep(self.policy.settle)  # a competing claim arrives in this window (or is caught later)
        with self._lock:
            winner = self._view.current
            if winner is not None and winner.token != self.token and winner.state == "held":
                self.lost = f"fleet {fleet} was claimed at the same time by {winner.describe()}, whose claim won"
        if self.lost:
            self._close(release=False)
            raise LeaderError(self.lost)
        self._held = True
        self.events.log(
            "fleet_claimed", None, holder=self.holder, run_id=self.run_id, ttl_s=self.policy.ttl, token=self.token[:8]
        )
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _read(self) -> Lease | None:
        """The retained lease, read through a round trip on a connection without a Last Will."""
        seen: list[bytes] = []
        probe = secrets.token_hex(16)
        back = threading.Event()

        def on_message(topic: str, payload: bytes) -> None:
            if probe_token(payload) == probe:
                back.set()
            elif payload and not back.is_set():
                seen.append(bytes(payload))

        link = MqttLink(self._options("r", will=None), on_message=on_message)
        link.subscribe(self.topics.leader, qos=1)
        link.start()
        try:
            if not link.wait_connected(self.connect_timeout):
                raise UsageError(
                    f"cannot reach the broker at {self.opts.url} within {self.connect_timeout:.0f}s: {link.last_error or 'no answer'}"
                )
            deadline = time.monotonic() + self.policy.barrier_timeout
            while not back.is_set():
                link.publish(self.topics.leader, encode_probe(probe), qos=1)
                if back.wait(min(1.0, max(0.0, deadline - time.monotonic()))) or time.monotonic() > deadline:
                    break
            if not back.is_set():
                raise LeaderError(f"fleet {self.topics.fleet}: cannot read the leader lease (no answer on {self.topics.leader})")
        finally:
            link.stop(timeout=1.0)
        view = LeaseView()
        for payload in seen:
            try:
                view.observe(payload)
            except ProtocolError as exc:
                self.events.log("lease_ignored", None, level=logging.WARNING, reason=exc.reason)
        return view.current

    # ------------------------------------------------------------ holding

    def _options(self, suffix: str, will: tuple[str, bytes, int, bool] | None) -> LinkOptions:
        # Our own client ids (never the main link's): a second aggregator's read must not kick anyone off.
        return dataclasses.replace(
            self.opts,
            client_id=f"{self.opts.client_id}-{suffix}{self.token[:8]}"[:128],
            clean_session=True,
            will=will,
            backoff_max=2.0,
        )

    def _lease(self, state: str) -> Lease:
        now = time.time()
        return Lease(
            state,
            self.run_id,
            self.token,
            self.holder,
            self.claimed_at or now,
            now,
            now + (self.policy.ttl if state == "held" else 0.0),
        )

    def _open_holder_link(self) -> None:
        will = (self.topics.leader, self._lease("released").encode(), 1, True)
        self._link = MqttLink(self._options("lease-", will), on_message=self._on_message, on_connect=self._on_connect)
        self._link.subscribe(self.topics.leader, qos=1)
        self._link.start()
        if not self._link.wait_connected(self.connect_timeout):
            self._close(release=False)
            raise UsageError(f"cannot reach the broker at {self.opts.url} within {self.connect_timeout:.0f}s")

    def _publish(self, state: str) -> None:
        assert self._link is not None
        # Through paho directly: the lease must never be in the link's republish set.
        self._link.client.publish(self.topics.leader, self._lease(state).encode(), qos=1, retain=True)

    def _barrier(self) -> bool:
        """True once a probe published now came back (everything before it has arrived)."""
        assert self._link is not None
        probe = secrets.token_hex(16)
        back = self._probes[probe] = threading.Event()
        try:
            deadline = time.monotonic() + self.policy.barrier_timeout
            while time.monotonic() < deadline and not self._stop.is_set():
                self._link.publish(self.topics.leader, encode_probe(probe), qos=1)
                if back.wait(1.0):
                    return True
            return False
        finally:
            self._probes.pop(probe, None)

    def _on_connect(self) -> None:  # network thread
        if self.claimed_at:
            self._reconnected = True
            self._kick.set()

    def _on_message(self, topic: str, payload: bytes) -> None:  # network thread
        token = probe_token(payload)
        if token is not None:
            ev = self._probes.get(token)
            if ev is not None:
                ev.set()
            return
        if not payload:
            return
        try:
            raw = Lease.decode(payload)
        except ProtocolError as exc:
            self.events.log("lease_ignored", None, level=logging.WARNING, reason=exc.reason)
            return
        with self._lock:
            self._view.observe(payload)
            if raw.token == self.token or self.lost:
                return
            mine = self._lease("held")
            if raw.state == "held" and raw.beats(mine):
                self.lost = f"fleet {self.topics.fleet} was taken over by {raw.describe()}"
            else:
                self._kick.set()  # a stale release or renewal overwrote the retained lease: renew ours now
                return
        if self._held:
            self._lose()

    def _lose(self) -> None:
        self._held = False
        self._kick.set()
        self.events.log("fleet_lost", None, level=logging.ERROR, reason=self.lost)
        self.on_lost(self.lost)

    def _renew_loop(self) -> None:
        interval = self.policy.ttl / 3
        while not self._stop.is_set():
            self._kick.wait(interval)
            self._kick.clear()
            if self._stop.is_set() or not self._held:
                return
            if self._reconnected:
                # Back after a disconnect: read what happened meanwhile before writing anything.
                self._reconnected = False
                if not self._barrier():
                    self._reconnected = True
                    continue
                if not self._held:
                    return
            self._publish("held")

    # ------------------------------------------------------------ release

    def release(self) -> None:
        """Say "released" (when we still hold the fleet) and disconnect without the Last Will."""
        self._close(release=self._held and not self.lost)

    def _close(self, release: bool) -> None:
        self._held = False
        self._stop.set()
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if self._link is None:
            return
        if release:
            self._link.client.publish(self.topics.leader, self._lease("released").encode(), qos=1, retain=True)
            self.events.log("fleet_released", None, holder=self.holder, run_id=self.run_id)
        self._link.stop(timeout=3.0)
        self._link = None

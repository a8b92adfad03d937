"""One device on one thread: the agent's event loop is its MQTT loop.

    host = LoneHost()
    agent = DeviceAgent(cfg, link_factory=host.link_factory, post=host.post, service=host.service)
    host.run(agent)                       # what DeviceAgent.run() does for a lone device

Why not paho's own network thread (as before): every round then crossed threads twice on the
device. The global model went network thread -> queue -> agent thread (a wake-up, then a GIL
hand-off), and the update went agent thread -> paho's wake-up socket pair -> network thread,
which needed the GIL while the agent thread wrote its state and log line. On this 2-core
machine those crossings cost 0.3-1.5 ms each per round (bench/bench_round.py, hop timestamps).
Here one epoll (core/mqtt_epoll.py, the swarm's loop) serves the socket: a message is handled
as soon as it is read, and a publish is written from the same thread at once (EpollLink).

The state write that follows a send waits for a quiet moment (QUIET_S without an event, at most
STATE_STALE_S): a crash before it loses nothing, the pending update file says what was pending
(state.recover_pending).

The state machine is unchanged: events are queued by paho's callbacks and handled one at a time
by `agent.handle`. While an event is being handled (a local training can take minutes on a real
device) the loop is not polled, so the engine calls `service()` between training steps: at most
every SERVICE_EVERY_S it serves the socket (keepalive pings, PUBACKs, reconnects), and whatever
it reads is only queued, handled after the training like any other event.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from fleetlearn.edge_runtime.core.mqtt_epoll import EpollLink, EpollLoop
from fleetlearn.edge_runtime.device.reporting import Event

if TYPE_CHECKING:
    from fleetlearn.edge_runtime.device.agent import DeviceAgent

POLL_S = 0.5  # the longest wait for a message: how often tick() runs (eligibility, heartbeat) and a stop is seen
SERVICE_EVERY_S = 1.0  # during a training, how often the socket is served (keepalive is >= 5 s)
DRAIN_S = 5.0  # at exit, how long the last status and the DISCONNECT may take to go out
# The state write after a send (agent._save_state_later) waits until the device handled no event
# for QUIET_S (in a fast run the next global model comes within milliseconds: the write would
# delay its handling), but never longer than STATE_STALE_S.
QUIET_S = 0.02
STATE_STALE_S = 1.0


class LoneHost:
    def __init__(self) -> None:
        self.loop = EpollLoop()
        self.inbox: deque[Event] = deque()
        self._served = time.monotonic()

    def link_factory(self, *args: Any, **kwargs: Any) -> EpollLink:
        return EpollLink(*args, loop=self.loop, **kwargs)

    def post(self, event: Event) -> None:
        self.inbox.append(event)

    def service(self) -> None:
        """Between training steps: serve the socket if it waited SERVICE_EVERY_S (events only queue)."""
        now = time.monotonic()
        if now - self._served >= SERVICE_EVERY_S:
            self._served = now
            self.loop.run_once(0.0)

    def run(self, agent: DeviceAgent) -> int:
        agent.start()
        busy = time.monotonic()  # when the agent last handled an event
        try:
            while not agent.stopping.is_set() and not agent.done:
                agent.tick()
                self.loop.run_once(self._timeout(agent, busy))
                self._served = now = time.monotonic()
                if self.inbox:
                    busy = now
                while self.inbox and not agent.stopping.is_set() and not agent.done:
                    agent.handle(self.inbox.popleft())
                    busy = time.monotonic()
                dirty = agent.state_dirty_since
                if dirty is not None and not self.inbox and (now - busy >= QUIET_S or now - dirty >= STATE_STALE_S):
                    agent.flush_state()
        finally:
            agent.close()
            self.loop.drain(DRAIN_S)  # the last status and the DISCONNECT go out
        return 0

    def _timeout(self, agent: DeviceAgent, busy: float) -> float:
        """How long the next poll may wait: not at all with events queued, until the quiet moment
        when a state write waits, else POLL_S."""
        if self.inbox:
            return 0.0
        if agent.state_dirty_since is None:
            return POLL_S
        now = time.monotonic()
        return max(0.0, min(busy + QUIET_S, agent.state_dirty_since + STATE_STALE_S) - now)

"""Many real devices in one process (`fleetlearn swarm`): N DeviceAgents, one epoll loop.

Each virtual device is the real device agent (edge_runtime/device/agent.py) with its own MQTT
connection, client id, Last Will, state dir (`<config's state_dir>/<id>`), state-dir lock and
data shard (`<its state dir>/shard.npz`): acks, durable pending updates, bundle fetch and
signing are the lone device's code. What the host changes: the link is an EpollLink (one epoll
for all sockets, see core/mqtt_epoll.py), events go to one queue, devices train one after
another on the host's thread, and a global-model frame received N times is decoded once
(device/wire.py SharedGlobalDecoder: identical bytes, one validated decode; the per-device
checks still run per device).

Training engines (engines/shared.py). A device keeps its optimizer state (AdamW moments, step
count) from round to round. With the portable engine all devices on a bundle share one session
pair and each device's state (plain arrays, ~20 KB for the Boston MLP) is copied in before it
trains; `engine = "auto"` picks it whenever the bundle has the step graph. onnxruntime-training
1.19.2's Python API cannot read or write optimizer state (restoring it means load_checkpoint plus
new Module and Optimizer sessions, 30 ms per switch, measured here), so with that engine (asked
for explicitly) each swarm device owns its session set, created once: 1.25 MB per device for the
Boston MLP with the FedProx inputs (100 sets measured). Either way a swarm device computes bit
for bit what a lone device with the same engine computes (tests/test_swarm.py).

Scheduling: handling events is bounded per loop turn (EVENT_BUDGET_S), so sockets are served
(PUBACKs, pings, incoming models) while 1,000 devices train one after another.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.mqtt_epoll import EpollLink, EpollLoop, raise_nofile_limit
from fleetlearn.edge_runtime.core.partition import parse_partition, partition
from fleetlearn.edge_runtime.device.agent import DeviceAgent, Event
from fleetlearn.edge_runtime.device.config import DeviceConfig
from fleetlearn.edge_runtime.device.wire import SharedGlobalDecoder
from fleetlearn.edge_runtime.engines.base import Engine
from fleetlearn.edge_runtime.engines.shared import SharedEngines

log = logging.getLogger("fleetlearn.swarm")

EVENT_BUDGET_S = 0.05  # at most this long handling events before the sockets are served again
TICK_INTERVAL_S = 0.5
FDS_PER_DEVICE = 4  # its socket and state-dir lock (paho makes its socket pair only for its own loop), with margin


def device_ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def partition_rows(spec: str, y: np.ndarray, devices: int, seed: int, task: str) -> list[np.ndarray]:
    """Row indices per device under `spec` (core/partition.py: iid, dirichlet:ALPHA, shards:K,
    quantity:ALPHA). With more devices than rows the rows are repeated ceil(devices/rows)
    times before partitioning (a row then lives on several devices), so every device has data;
    otherwise this is exactly the experiment's partition."""
    n = len(y)
    if n == 0:
        raise UsageError("--data holds no samples")
    parsed = parse_partition(spec)
    per_device = int(parsed.param or 1) if parsed.scheme == "shards" else 1  # shards:K needs K samples a device
    reps = max(1, math.ceil(devices * per_device / n))
    parts = partition(parsed, np.concatenate([np.asarray(y)] * reps), devices, seed, task=task)
    return [np.sort(part % n) for part in parts]


def write_shards(
    data_file: str, state_root: Path, ids: list[str], spec: str, seed: int, task: str, target: str | None = None
) -> list[Path]:
    """Each device's shard of `data_file` as `<state_root>/<id>/shard.npz` (raw rows: the agent
    preprocesses them as it does any local data file)."""
    from fleetlearn.edge_runtime.core.data import _read_csv, _read_npz  # raw arrays, before preprocessing

    path = Path(data_file)
    if not path.is_file():
        raise UsageError(f"--data {data_file}: file not found")
    x, y = _read_npz(path) if path.suffix == ".npz" else _read_csv(path, target)
    parts = partition_rows(spec, np.asarray(y), len(ids), seed, task)
    out = []
    for dev, idx in zip(ids, parts):
        d = state_root / dev
        d.mkdir(parents=True, exist_ok=True)
        shard = d / "shard.npz"
        np.savez(shard, x=x[idx], y=y[idx])
        out.append(shard)
    return out


def _syncfs(fd: int) -> None:
    """Flush the file system holding `fd` (data and metadata, renames included): Linux's
    syncfs(2); os.sync() where libc has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "syncfs", None)
    if fn is None or fn(fd) != 0:
        os.sync()


class GroupCommit:
    """Durable before sent, for many devices at one price: devices write their pending update
    without fsync and hand over the send; `flush()` syncs the state file system once and then
    sends them all. On this machine one fsync'd update cost about 14 ms (two fsyncs), so 1,000
    devices spent 14 s per round in fsync alone; a group commit costs one sync per batch."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(root, os.O_RDONLY)
        self._waiting: list[Callable[[], None]] = []
        self.syncs = 0

    def after_sync(self, send: Callable[[], None]) -> None:
        self._waiting.append(send)

    def flush(self) -> None:
        if not self._waiting:
            return
        _syncfs(self._fd)
        self.syncs += 1
        sends, self._waiting = self._waiting, []
        for send in sends:
            try:
                send()
            except Exception:  # one device's link must not stop the others' sends
                log.exception("event=swarm_send_failed")

    def close(self) -> None:
        os.close(self._fd)


class Swarm:
    """N device agents on one EpollLoop. `run()` until every device did --max-rounds rounds
    (or SIGTERM/SIGINT), then each says `offline` and disconnects cleanly."""

    def __init__(
        self,
        base: DeviceConfig,
        ids: list[str],
        shards: list[Path],
        max_rounds: int | None,
        engine_factory: Callable[..., Engine] | None = None,
    ):
        soft, hard = raise_nofile_limit()
        need = FDS_PER_DEVICE * len(ids) + 64
        if soft < need:
            raise UsageError(f"{len(ids)} devices need about {need} open files; the hard limit (ulimit -Hn) is {hard}: raise it")
        log.info("event=swarm_nofile soft=%d hard=%d needed=%d", soft, hard, need)
        self.loop = EpollLoop()
        self.events: collections.deque[tuple[DeviceAgent, Event]] = collections.deque()
        self.stopping = threading.Event()
        self.agents: list[DeviceAgent] = []
        self.commit = GroupCommit(Path(base.state_dir))
        self.engines = SharedEngines()
        # The same retained global model reaches every device: decoded and validated once per frame.
        self.global_decoder = SharedGlobalDecoder()
        link_factory = lambda *a, **kw: EpollLink(*a, loop=self.loop, **kw)  # noqa: E731
        # SharedEngines hands out DeviceEngine views, which speak the Engine interface.
        engine = engine_factory or cast("Callable[..., Engine]", self.engines)
        for dev, shard in zip(ids, shards):
            cfg = replace(base, device_id=dev, data=str(shard), state_dir=str(Path(base.state_dir) / dev))
            cell: list[DeviceAgent] = []
            agent = DeviceAgent(
                cfg,
                max_rounds,
                link_factory=link_factory,
                post=self._poster(cell),
                group_commit=self.commit,
                engine_factory=engine,
                global_decoder=self.global_decoder,
            )
            cell.append(agent)
            self.agents.append(agent)
        self._closed: set[int] = set()

    def _poster(self, cell: list[DeviceAgent]) -> Callable[[Event], None]:
        """The device's event sink: the host's one queue, tagged with the device (cell[0])."""

        def post(event: Event) -> None:
            self.events.append((cell[0], event))

        return post

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())

    def start(self) -> None:
        t = time.monotonic()
        for agent in self.agents:
            agent.start()
        log.info(
            "event=swarm_start devices=%d engine=%s engines_opened=%d setup_s=%.2f",
            len(self.agents),
            ",".join(sorted(self.engines.names)) or "none",
            self.engines.opened,
            time.monotonic() - t,
        )

    def run(self) -> int:
        self._install_signal_handlers()
        self.start()
        next_tick = time.monotonic()
        try:
            while not self.stopping.is_set():
                self.loop.run_once(0.0 if self.events else 0.1)
                end = time.monotonic() + EVENT_BUDGET_S
                while self.events and time.monotonic() < end:
                    agent, event = self.events.popleft()
                    if id(agent) not in self._closed:
                        agent.handle(event)
                        if agent.done:
                            self._close(agent)
                self.commit.flush()  # what this batch trained is now durable, and sent
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_INTERVAL_S
                    for agent in self.agents:
                        if id(agent) not in self._closed:
                            agent.tick()
                if len(self._closed) == len(self.agents):
                    break
        finally:
            self.commit.flush()
            for agent in self.agents:
                self._close(agent)
            self._drain(5.0)
            log.info(
                "event=swarm_stop devices=%d rounds=%d global_decodes=%d global_shared=%d",
                len(self.agents),
                sum(a.rounds_done for a in self.agents),
                self.global_decoder.decoded,
                self.global_decoder.shared,
            )
        return 0

    def _close(self, agent: DeviceAgent) -> None:
        if id(agent) not in self._closed:
            self._closed.add(id(agent))
            agent.close()

    def _drain(self, timeout: float) -> None:
        """Serve the sockets until every clean DISCONNECT went out (or timeout)."""
        self.loop.drain(timeout)
        self.commit.close()

"""One engine's sessions shared by many devices in one process (the swarm), each device with its
own weights, optimizer state and buffers.

`SharedEngines` is an `engine_factory` for DeviceAgent. For the portable engine, whose whole
training state is plain arrays (`PortableEngine.live_state`), all devices on one bundle share one
PortableEngine (one pair of ONNX Runtime sessions) and each gets a `DeviceEngine` view holding
its own copy of the state (3 x params floats for AdamW plus buffers: about 20 KB for the Boston
MLP). Before a view is used its state is copied into the engine (after the previous owner's
state was copied out), so a device computes bit for bit what a lone engine would.
onnxruntime-training 1.19.2 cannot read or write its optimizer state from Python, so with that
engine every device gets its own engine (its own sessions), as `open_engine` gives it.

`engine = "auto"` means the portable engine here whenever the bundle carries its step graph
(`swarm_engine`), although a lone device's `auto` prefers onnxruntime-training: measured with the
Boston MLP (bench/bench_swarm.py, 100 vs 1,000 devices), a swarm device costs 0.08 MB on top of
the one shared session pair against 1.37 MB with a session set of its own, and the 1,000 session
sets took most of a 1,000-device swarm's start. An explicit engine is always honoured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.engines.base import Engine
from fleetlearn.edge_runtime.engines.select import choose_engine, open_engine


def swarm_engine(manifest: Manifest, engine: str = "auto") -> str:
    """The engine a swarm device opens: `auto` is the portable engine (shared sessions) when the
    bundle has its step graph, else what `choose_engine` says (errors included)."""
    if engine == "auto" and manifest.portable is not None:
        engine = "portable"
    return choose_engine(manifest, engine)


class _Slot:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.fresh: dict[str, np.ndarray] = {k: v.copy() for k, v in engine.live_state().items()}  # the bundle's initial state
        self.owner: DeviceEngine | None = None


class DeviceEngine:
    """One device's view of a shared portable engine: the Engine calls the agent makes
    (set_weights, get_weights, train, evaluate) on this device's own state."""

    def __init__(self, slot: _Slot):
        self._slot = slot
        self._state = {k: v.copy() for k, v in slot.fresh.items()}
        e = slot.engine
        self.name, self.manifest, self.default_lr, self.threads = e.name, e.manifest, e.default_lr, e.threads

    def _activate(self):
        slot = self._slot
        if slot.owner is not self:
            live = slot.engine.live_state()
            if slot.owner is not None:
                for k, v in slot.owner._state.items():
                    np.copyto(v, live[k])
            for k, v in self._state.items():
                np.copyto(live[k], v)
            slot.owner = self
        return slot.engine

    def set_weights(self, flat: np.ndarray) -> None:
        self._activate().set_weights(flat)

    def get_weights(self) -> np.ndarray:
        return self._activate().get_weights()

    def train(self, *args, **kwargs):
        return self._activate().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        return self._activate().evaluate(*args, **kwargs)

    def export_inference_model(self, path: str | Path) -> None:
        self._activate().export_inference_model(path)


class SharedEngines:
    """engine_factory(bundle_dir, manifest, engine, threads): a DeviceEngine on one shared
    portable engine per (bundle dir, model hash, threads); any other engine opened per device.
    `auto` is resolved by `swarm_engine`."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str, int], _Slot] = {}
        self.opened = 0  # engines (session sets) opened, for the bench and tests
        self.names: set[str] = set()  # the engines devices got, for the swarm's log

    def __call__(
        self, bundle_dir: str | Path, manifest: Manifest, engine: str = "auto", threads: int = 1
    ) -> Engine | DeviceEngine:
        name = swarm_engine(manifest, engine)
        self.names.add(name)
        if name != "portable":
            self.opened += 1
            return open_engine(bundle_dir, manifest, name, threads=threads)
        key = (os.path.realpath(bundle_dir), manifest.model_hash, threads)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(open_engine(bundle_dir, manifest, "portable", threads=threads))
            self.opened += 1
        return cast(Engine, DeviceEngine(slot))  # duck-typed: the Engine calls an agent makes

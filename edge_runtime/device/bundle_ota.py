"""Bundle over the air, the device side: follow an announcement, assemble its chunks, install,
then train on the global model that was waiting for it. A mixin of DeviceAgent (it uses the
agent's link, topics, signer, status and logging), kept apart so the agent stays one screen of
protocol logic."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fleetlearn.edge_runtime.core.errors import BundleError, ProtocolError
from fleetlearn.edge_runtime.core.protocol import BundleAnnouncement
from fleetlearn.edge_runtime.device.bundle_fetch import BundleAssembly

if TYPE_CHECKING:
    from fleetlearn.edge_runtime.core.bundle import Manifest
    from fleetlearn.edge_runtime.core.mqtt import MqttLink
    from fleetlearn.edge_runtime.core.protocol import GlobalModel, Topics
    from fleetlearn.edge_runtime.device.config import DeviceConfig


class BundleOverTheAir:
    # What DeviceAgent provides (declared for the type checker).
    cfg: DeviceConfig
    link: MqttLink
    topics: Topics
    signer: Any
    manifest: Manifest | None
    assembly: BundleAssembly | None
    waiting_global: GlobalModel | None

    if TYPE_CHECKING:

        def _status(self, state: str, round_: int | None = None, detail: str = "", force: bool = False) -> None: ...
        def _log(self, level: int, event: str, round_: int | None = None, **fields: Any) -> None: ...
        def _load_bundle(self) -> bool: ...
        def _handle_global(self, g: GlobalModel) -> None: ...

    def _on_bundle_announcement(self, payload: bytes) -> None:
        if not payload:
            return
        if self.signer and not self.signer.verify_announcement(payload):
            raise ProtocolError("bundle announcement signature does not verify with the aggregator's key")
        a = BundleAnnouncement.decode(payload)
        if self.manifest is not None and a.model_hash == self.manifest.model_hash:
            return
        if self.assembly and self.assembly.model_hash == a.model_hash:
            return
        if self.assembly:
            self.link.unsubscribe(self.topics.bundle_chunks(self.assembly.model_hash))
        self.assembly = BundleAssembly(a)
        self._status("fetching", detail=f"bundle {a.model_hash[:12]}, {a.total_bytes} bytes")
        self._log(logging.INFO, "bundle_fetch", model_hash=a.model_hash[:12], bytes=a.total_bytes, chunks=a.chunks)
        self.link.subscribe(self.topics.bundle_chunks(a.model_hash), qos=1)

    def _on_bundle_chunk(self, payload: bytes) -> None:
        assembly = self.assembly
        assert assembly is not None
        if not payload:
            return
        assembly.add(payload)
        if not assembly.complete:
            return
        self.link.unsubscribe(self.topics.bundle_chunks(assembly.model_hash))
        self.assembly = None
        try:
            assembly.install(self.cfg.bundle)
        except BundleError as exc:
            self._log(logging.ERROR, "bundle_rejected", reason=str(exc))
            self._status("error", detail=str(exc))
            return
        self._log(logging.INFO, "bundle_installed", model_hash=assembly.model_hash[:12])
        if self._load_bundle() and self.waiting_global is not None:
            g, self.waiting_global = self.waiting_global, None
            self._handle_global(g)  # the global model we had to park
        else:
            self._status("idle")

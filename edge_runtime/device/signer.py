"""The device's update signer and global-model verifier, from its [signing] config (or None)."""

from __future__ import annotations

import logging

from fleetlearn.edge_runtime.device.config import DeviceConfig

log = logging.getLogger("fleetlearn.device")


def load_signer(cfg: DeviceConfig):
    """The update signer / global-model verifier, when the config names keys (issue: security)."""
    if not (cfg.signing.key_file or cfg.signing.aggregator_public_key):
        log.info("event=signing device=%s signs_updates=no verifies_globals=no reason='no [signing] keys configured'", cfg.device_id)
        return None
    from fleetlearn.edge_runtime.core.signing import DeviceSigner  # needs `cryptography`, only when keys are configured

    return DeviceSigner.from_config(cfg.signing, cfg.device_id)

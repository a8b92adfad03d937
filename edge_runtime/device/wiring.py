"""What a device config turns into at start: the MQTT link options and the signer."""

from __future__ import annotations

import logging

from fleetlearn.edge_runtime.core.mqtt import LinkOptions
from fleetlearn.edge_runtime.device.config import DeviceConfig

log = logging.getLogger("fleetlearn.device")


def link_options(c: DeviceConfig) -> LinkOptions:
    """One persistent-session MQTT connection per device id (client id fleetlearn-<fleet>-<id>)."""
    return LinkOptions(
        url=c.broker,
        client_id=f"fleetlearn-{c.fleet}-{c.device_id}",
        username=c.auth.username,
        password=c.auth.read_password(),
        ca_file=c.tls.ca_file,
        cert_file=c.tls.cert_file,
        key_file=c.tls.key_file,
        insecure_skip_hostname=c.tls.insecure_skip_hostname,
        protocol=c.mqtt_protocol,
        keepalive=c.keepalive,
        clean_session=False,
    )


def load_signer(cfg: DeviceConfig):
    """The update signer / global-model verifier, when the config names keys (issue: security)."""
    if not (cfg.signing.key_file or cfg.signing.aggregator_public_key):
        log.info(
            "event=signing device=%s signs_updates=no verifies_globals=no reason='no [signing] keys configured'", cfg.device_id
        )
        return None
    from fleetlearn.edge_runtime.core.signing import DeviceSigner  # needs `cryptography`, only when keys are configured

    return DeviceSigner.from_config(cfg.signing, cfg.device_id)

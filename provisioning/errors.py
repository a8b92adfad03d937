"""The provisioning tool's one error type."""

from __future__ import annotations

from fleetlearn.edge_runtime.core.errors import UsageError


class BrokerConfigError(UsageError):
    """Bad input to broker-config (or flash --credentials); printed as one line, exit 2."""


class CredentialsError(UsageError):
    """A credentials directory lacks what `flash --credentials` needs; one line, exit 2."""

"""Typed errors. Each carries a one-line reason a user (or operator) can act on."""

from __future__ import annotations


class FleetlearnError(Exception):
    """Base of every error fleetlearn raises on purpose."""


class UsageError(FleetlearnError):
    """Bad command-line input or configuration; the CLI prints it as one line and exits 2."""


class ConfigError(UsageError):
    """A config file is missing, malformed, has an unknown key or a value of the wrong type."""


class BundleError(UsageError):
    """An export bundle is missing, corrupt (sha256 mismatch) or not of a format we read."""


class DataError(UsageError):
    """Local training or test data is missing, empty, ragged or holds NaN/Inf."""


class ProtocolError(FleetlearnError):
    """A network message was rejected. `reason` is the one-line why, safe to log and to send back."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

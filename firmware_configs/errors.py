"""Typed errors for provisioning. All are UsageErrors: the CLI prints one line and exits 2."""

from __future__ import annotations

from fleetlearn.edge_runtime.core.errors import UsageError


class FlashError(UsageError):
    """`fleetlearn flash` cannot write the image (bad input, missing tool, failed download)."""


class ProfileError(FlashError):
    """A device profile is unknown or its TOML breaks the profile schema."""

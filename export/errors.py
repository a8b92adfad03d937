"""Errors raised by `fleetlearn export`.

All of them derive from `fleetlearn.edge_runtime.core.errors.UsageError`, so the CLI prints them as one line and
exits with code 2. `ExportError` is for a model that cannot become a bundle (it does not export
to ONNX, or ORT cannot build its gradient graph); plain `UsageError` is for bad arguments.
"""

from __future__ import annotations

from fleetlearn.edge_runtime.core.errors import BundleError, DataError, UsageError


class ExportError(UsageError):
    """The model cannot be turned into an on-device training bundle; the message says why."""


__all__ = ["BundleError", "DataError", "ExportError", "UsageError"]

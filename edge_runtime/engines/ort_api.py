"""The one place that reaches onnxruntime's on-device training API.

Why this file exists: in onnxruntime-training 1.19.2, `import onnxruntime.training` runs a
package `__init__` that imports `optim` and `amp`, which import torch. A device has no torch.
And `import onnxruntime` itself probes `onnxruntime.training.ortmodule` (torch again) to
report its build info. The training API (`onnxruntime.training.api`: Module, Optimizer,
CheckpointState) needs none of that: it is a thin wrapper over the C++ extension.

So, before onnxruntime is imported, we register a bare package object for
`onnxruntime.training` (same directory, so its submodules still import normally, but its
`__init__` never runs) and block `onnxruntime.training.ortmodule`. Doing this *before* any
plain `import onnxruntime` also matters for memory: measured here, a device process that
imported onnxruntime first used about 13 MB more RSS (86 MB against 73 MB).

If the real `onnxruntime.training` package is already imported (the export side, which has
torch), we leave it alone: `setdefault` keeps whatever is there.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types


def _install_training_stub() -> None:
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("onnxruntime-training is not installed: pip install 'fleetlearn[edge]'")
    training_dir = os.path.join(os.path.dirname(spec.origin), "training")
    stub = types.ModuleType("onnxruntime.training")
    stub.__path__ = [training_dir]
    stub.__package__ = "onnxruntime.training"
    sys.modules["onnxruntime.training"] = stub
    # A None entry makes `import onnxruntime.training.ortmodule` raise ImportError at once,
    # which onnxruntime's build-info probe already treats as "no ORTModule".
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]  # None is the documented "not importable" marker


_install_training_stub()

import onnxruntime as _ort  # noqa: E402  (already imported by the line above; no extra cost)
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import SessionOptions  # noqa: E402
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: E402

ORT_VERSION: str = _ort.__version__


def set_log_severity(level: int = 3) -> None:
    """Silence ORT's INFO/WARNING chatter on stderr (3 = errors only)."""
    _ort.set_default_logger_severity(level)


__all__ = ["CheckpointState", "Module", "Optimizer", "OrtValue", "SessionOptions", "ORT_VERSION", "set_log_severity"]

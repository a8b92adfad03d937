"""Choose and open a training engine for a bundle: `open_engine(bundle_dir, manifest, engine, threads)`.

    engine = "ort-training"  onnxruntime-training's on-device training API (x86_64 wheels only)
    engine = "portable"      the bundle's plain-ONNX step graph on any onnxruntime (any architecture)
    engine = "auto"          ort-training when onnxruntime-training is importable and the bundle
                             carries it, else portable

Every refusal is a BundleError or UsageError with a one-line reason naming the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.errors import BundleError, UsageError
from fleetlearn.edge_runtime.engines.base import Engine

ENGINE_CHOICES = ("auto", "ort-training", "portable")


def ort_training_available() -> bool:
    """Is onnxruntime's on-device training API installed? Checked without importing it (or torch)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return False
    api = os.path.join(os.path.dirname(spec.origin), "training", "api")
    return os.path.isdir(api)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def choose_engine(manifest: Manifest, engine: str = "auto") -> str:
    """The engine `open_engine` would open, or a one-line error saying why none fits."""
    if engine not in ENGINE_CHOICES:
        raise UsageError(f"unknown training engine {engine!r}; one of: {', '.join(ENGINE_CHOICES)}")
    if not onnxruntime_available():
        raise UsageError("onnxruntime is not installed: pip install 'fleetlearn[edge]' (or 'fleetlearn[edge-portable]')")
    has_ort = ort_training_available()
    if engine == "auto":
        if has_ort and "ort-training" in manifest.engines:
            return "ort-training"
        if manifest.portable is not None:
            return "portable"
        if "ort-training" in manifest.engines:
            raise BundleError(
                f"bundle {manifest.model_name} needs onnxruntime-training (no portable step graph) and this "
                "onnxruntime has no training API; re-export the bundle with a current fleetlearn"
            )
        raise BundleError(f"bundle {manifest.model_name} lists no engine this device can run: {', '.join(manifest.engines)}")
    if engine == "portable":
        if manifest.portable is None:
            raise BundleError(
                f"device asks for the portable engine but bundle {manifest.model_name} has no portable step graph "
                f"(engines: {', '.join(manifest.engines)}); re-export it with a current fleetlearn"
            )
        return "portable"
    if "ort-training" not in manifest.engines:
        raise BundleError(
            f"device asks for ort-training but bundle {manifest.model_name} only carries: {', '.join(manifest.engines)}"
        )
    if not has_ort:
        raise UsageError(
            'device asks for ort-training but onnxruntime-training is not installed (x86_64 only); use engine = "portable" or "auto"'
        )
    return "ort-training"


def open_engine(bundle_dir: str | Path, manifest: Manifest, engine: str = "auto", threads: int = 1) -> Engine:
    """Open the chosen engine on a verified bundle. Raises BundleError/UsageError (one line)."""
    name = choose_engine(manifest, engine)
    if name == "ort-training":
        from fleetlearn.edge_runtime.engines.ort_training import OrtTrainingEngine

        return OrtTrainingEngine(bundle_dir, manifest, threads=threads)
    from fleetlearn.edge_runtime.engines.portable import PortableEngine

    return PortableEngine(bundle_dir, manifest, threads=threads)

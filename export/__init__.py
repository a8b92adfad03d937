"""fleetlearn export: a PyTorch model -> an ONNX Runtime on-device training bundle.

    from fleetlearn.export import build_bundle, resolve_model
    model, defaults = resolve_model("boston-mlp", seed=0)
    manifest = build_bundle(model, "bundles/boston", model_name=defaults.name,
                            input_shape=defaults.input_shape, loss=defaults.loss)

Importing this package is cheap: torch, onnx and onnxruntime are imported when a function that
needs them runs (the `fleetlearn` CLI imports `fleetlearn.export.cli` just to build its argument parser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlearn.export.build import build_bundle
    from fleetlearn.export.optimizers import OptimizerConfig
    from fleetlearn.export.resolve import ModelDefaults, resolve_model

__all__ = ["build_bundle", "resolve_model", "ModelDefaults", "OptimizerConfig"]

_LAZY = {
    "build_bundle": "fleetlearn.export.build",
    "resolve_model": "fleetlearn.export.resolve",
    "ModelDefaults": "fleetlearn.export.resolve",
    "OptimizerConfig": "fleetlearn.export.optimizers",
}


def __getattr__(name: str) -> Any:
    # PEP 562: resolve the public names on first use so `import export` stays light.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

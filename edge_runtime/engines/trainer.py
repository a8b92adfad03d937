"""Compatibility names: `Trainer` is the onnxruntime-training engine.

New code opens an engine with `fleetlearn.edge_runtime.engines.select.open_engine`, which also
offers the portable engine (plain onnxruntime); see engines/base.py for the interface.
"""

from __future__ import annotations

from fleetlearn.edge_runtime.engines.base import Engine, EvalResult, TrainResult
from fleetlearn.edge_runtime.engines.ort_training import OrtTrainingEngine as Trainer

__all__ = ["Engine", "EvalResult", "TrainResult", "Trainer"]

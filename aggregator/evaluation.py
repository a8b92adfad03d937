"""Evaluating a global model, and writing the final forward-only model: the engine's one use
of the on-device training engine (the same Trainer a device runs, on the bundle's artifacts).

    ev = Evaluator(bundle_dir, manifest, test_data=Path("test.npz"))   # test_data may be None
    ev.initial_weights()              # w_0, the bundle's own weights
    ev.evaluate(w)                    # {"test_mse": ..., "test_loss": ..., "eval_s": ...}, {} without data
    ev.export_final(w, path)          # STATE_DIR/model.onnx, written to a temp file and renamed
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest


class Evaluator:
    def __init__(self, bundle_dir: Path, manifest: Manifest, test_data: Path | None = None):
        from fleetlearn.edge_runtime.core.data import load_dataset
        from fleetlearn.edge_runtime.engines.trainer import Trainer

        self.test_data = load_dataset(test_data, manifest) if test_data is not None else None
        self.trainer = Trainer(bundle_dir, manifest)

    def initial_weights(self) -> np.ndarray:
        return self.trainer.get_weights()

    def evaluate(self, weights: np.ndarray) -> dict[str, Any]:
        """The round record's evaluation fields for `weights` ({} when there is no test data)."""
        if self.test_data is None:
            return {}
        t0 = time.perf_counter()
        self.trainer.set_weights(weights)
        result = self.trainer.evaluate(self.test_data)
        name, value = result.metric()
        return {name: value, "test_loss": result.loss, "eval_s": round(time.perf_counter() - t0, 4)}

    def export_final(self, weights: np.ndarray, out: Path) -> None:
        """The forward-only model with `weights`, atomically at `out`."""
        tmp = out.with_name("." + out.stem + ".tmp" + out.suffix)
        self.trainer.set_weights(weights)
        self.trainer.export_inference_model(tmp)
        os.replace(tmp, out)

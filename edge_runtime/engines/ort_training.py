"""The onnxruntime-training engine: ORT's on-device training API (x86_64 wheels only; no torch).

Weights move in and out as one flat float32 vector in the manifest's parameter order, through
ORT's contiguous parameter buffer, so loading a global model is one copy, not one per tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.errors import BundleError
from fleetlearn.edge_runtime.engines import ort_api
from fleetlearn.edge_runtime.engines.base import Engine


class OrtTrainingEngine(Engine):
    """One ORT training session over a bundle (training_model/eval_model/optimizer_model/checkpoint)."""

    name = "ort-training"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int = 1):
        ort_api.set_log_severity(3)
        root = Path(bundle_dir)
        self.manifest = manifest
        self._state = ort_api.CheckpointState.load_checkpoint(str(root / "checkpoint"))
        options = ort_api.SessionOptions()
        options.intra_op_num_threads = threads  # a Pi has 4 cores and other work to do
        options.inter_op_num_threads = 1
        self._module = ort_api.Module(
            str(root / "training_model.onnx"), self._state, str(root / "eval_model.onnx"), session_options=options
        )
        self._optimizer = ort_api.Optimizer(str(root / "optimizer_model.onnx"), self._module)
        self.default_lr = float(manifest.optimizer.get("lr", 1e-3))
        self._optimizer.set_learning_rate(self.default_lr)
        size = self._module.get_parameters_size(trainable_only=True)
        if size != manifest.num_params:
            raise BundleError(f"bundle's training graph has {size} parameters, its manifest says {manifest.num_params}")
        self.threads = threads
        self._prox_feeds: list[np.ndarray] = []  # FedProx's extra inputs, in the training graph's order

    def get_weights(self) -> np.ndarray:
        # trainable_only must be explicit: get_contiguous_parameters() defaults to all parameters
        # while copy_buffer_to_parameters() defaults to trainable ones (ORT 1.19.2).
        return self._module.get_contiguous_parameters(trainable_only=True).numpy().astype(np.float32, copy=True)

    def set_weights(self, flat: np.ndarray) -> None:
        if flat.shape != (self.manifest.num_params,):
            raise ValueError(f"weights have shape {flat.shape}, expected ({self.manifest.num_params},)")
        buf = ort_api.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        # copy_buffer_to_parameters wants the internal C OrtValue of the public wrapper.
        self._module.copy_buffer_to_parameters(buf._ortvalue, trainable_only=True)

    def _begin_train(self, lr: float, mu: float) -> None:
        self._optimizer.set_learning_rate(lr)
        self._module.train()
        if self.manifest.proximal:
            # The training graph's inputs after (input, label): `mu` and one `global.<param>` per
            # trainable tensor (export/ort_proximal.py); w_g = the weights now, split by the manifest.
            anchor = self.get_weights()
            views = {"global." + p.name: anchor[p.offset : p.offset + p.size].reshape(p.shape) for p in self.manifest.params}
            views["mu"] = np.asarray(mu, np.float32)
            names = self._module.input_names()[2:]
            missing = [n for n in names if n not in views]
            if missing or len(names) != len(views):
                raise BundleError(f"training graph's proximal inputs {names[:4]} do not match the manifest's parameters")
            self._prox_feeds = [views[n] for n in names]

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        out = self._module(x, y, *self._prox_feeds)
        # A proximal graph returns (objective, data loss): report the data loss.
        loss = (out[1] if self._prox_feeds else out[0]) if isinstance(out, (tuple, list)) else out
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return float(loss)

    def evaluate(self, data, batch_size: int = 256):
        self._module.eval()
        return super().evaluate(data, batch_size)

    def _eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        out = self._module(x, y)
        loss, pred = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        return float(loss), pred

    def export_inference_model(self, path: str | Path) -> None:
        self._module.export_model_for_inferencing(str(path), [self.manifest.output_name])

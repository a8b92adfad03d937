"""Local training through ONNX Runtime's on-device training API (no torch).

Weights move in and out as one flat float32 vector in the manifest's parameter order, through
ORT's contiguous parameter buffer, so loading a global model is one copy, not one per tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.engines import ort_api
from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.data import Dataset
from fleetlearn.edge_runtime.core.errors import BundleError


@dataclass(frozen=True)
class TrainResult:
    steps: int
    samples: int  # samples seen per epoch (the FedAvg weight is the local dataset size)
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    mse: float | None = None
    accuracy: float | None = None

    def metric(self) -> tuple[str, float]:
        """The round's headline test metric: test_mse for regression, test_accuracy otherwise."""
        if self.accuracy is not None:
            return "test_accuracy", self.accuracy
        return "test_mse", float(self.mse if self.mse is not None else self.loss)


class Trainer:
    """One ORT training session over a bundle. Not thread-safe; one per process is enough."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int = 1):
        ort_api.set_log_severity(3)
        root = Path(bundle_dir)
        self.manifest = manifest
        self._state = ort_api.CheckpointState.load_checkpoint(str(root / "checkpoint"))
        options = ort_api.SessionOptions()
        options.intra_op_num_threads = threads  # a Pi has 4 cores and other work to do
        options.inter_op_num_threads = 1
        self._module = ort_api.Module(str(root / "training_model.onnx"), self._state, str(root / "eval_model.onnx"), session_options=options)
        self._optimizer = ort_api.Optimizer(str(root / "optimizer_model.onnx"), self._module)
        self.default_lr = float(manifest.optimizer.get("lr", 1e-3))
        self._optimizer.set_learning_rate(self.default_lr)
        size = self._module.get_parameters_size(trainable_only=True)
        if size != manifest.num_params:
            raise BundleError(f"bundle's training graph has {size} parameters, its manifest says {manifest.num_params}")
        self.threads = threads

    # -------------------------------------------------------------- weights

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

    # -------------------------------------------------------------- training

    def train(self, data: Dataset, batch_size: int, epochs: int = 1, max_steps: int | None = None, seed: int = 0, lr: float | None = None) -> TrainResult:
        """Shuffled mini-batch training; returns the sample-weighted mean training loss."""
        self._optimizer.set_learning_rate(self.default_lr if lr is None else lr)
        self._module.train()
        rng = np.random.default_rng(seed)
        n = len(data)
        steps, loss_sum, seen = 0, 0.0, 0
        start = time.perf_counter()
        for _ in range(epochs):
            order = rng.permutation(n)
            for lo in range(0, n, batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                idx = order[lo : lo + batch_size]
                out = self._module(data.x[idx], data.y[idx])
                loss = out[0] if isinstance(out, (tuple, list)) else out
                self._optimizer.step()
                self._module.lazy_reset_grad()
                loss_sum += float(loss) * len(idx)
                seen += len(idx)
                steps += 1
        seconds = time.perf_counter() - start
        return TrainResult(steps=steps, samples=n, mean_loss=loss_sum / max(seen, 1), seconds=seconds)

    # -------------------------------------------------------------- evaluation

    def evaluate(self, data: Dataset, batch_size: int = 256) -> EvalResult:
        """Loss plus the task's metric (MSE for regression, accuracy for classification)."""
        self._module.eval()
        n = len(data)
        loss_sum, sq_sum, correct = 0.0, 0.0, 0
        for lo in range(0, n, batch_size):
            x, y = data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]
            out = self._module(x, y)
            loss, pred = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
            loss_sum += float(loss) * len(x)
            if pred is None:
                continue
            if self.manifest.task == "regression":
                sq_sum += float(np.sum((pred.reshape(y.shape).astype(np.float64) - y) ** 2))
            elif self.manifest.task == "classification":
                correct += int(np.sum(np.argmax(pred, axis=-1) == y))
            else:  # binary, logits
                correct += int(np.sum((pred.reshape(y.shape) > 0) == (y > 0.5)))
        if self.manifest.task == "regression":
            return EvalResult(loss=loss_sum / n, mse=sq_sum / (n * max(1, int(np.prod(self.manifest.output_shape)))))
        return EvalResult(loss=loss_sum / n, accuracy=correct / (n * (1 if self.manifest.task == "classification" else int(np.prod(self.manifest.output_shape)))))

    def export_inference_model(self, path: str | Path) -> None:
        """Write a forward-only ONNX model with the current weights (for serving after training)."""
        self._module.export_model_for_inferencing(str(path), [self.manifest.output_name])

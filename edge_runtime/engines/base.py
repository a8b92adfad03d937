"""The one trainer interface the device agent, the aggregator and the tools use, and its results.

An engine holds one model (the flat float32 parameter vector of the manifest), its optimizer state
and its train-mode buffers, and runs mini-batch training and evaluation on it. Two engines
implement it (`ort_training`, `portable`); `select.open_engine` picks one. The batch loop and the
metrics live here, so both engines see the same batches in the same order and report the same
numbers: on one bundle they agree to float32 rounding (tests/test_engines.py).

FedProx (Li et al. 2020): `train(..., mu=μ)` minimises loss + μ/2 ‖w − w_g‖², where w_g is the
weights when `train` is called (a device has just loaded the round's global model). The term is in
the bundle's training graphs (manifest `proximal`); μ = 0 trains exactly as a bundle without it,
and μ > 0 on a bundle without it is refused (BundleError) before any step.

Optimizer state (AdamW's moments and step count, SGD's momentum) persists across `train` calls
and is not reset by `set_weights`: a device keeps it from round to round, as onnxruntime-training's
Optimizer always did.

The batch order is `epoch_order`: a keyed hash of each sample index, sorted. Not numpy.random:
importing it costs a device process about 7 MB of RSS (numpy loads its bit generators), more than
all of fleetlearn's own modules (docs/benchmarks.md, the device's peak RSS).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.data import Dataset
from fleetlearn.edge_runtime.core.errors import BundleError

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(z):
    """SplitMix64's finaliser (Steele, Lea, Flood 2014) on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_order(seed: int | Sequence[int], epoch: int, n: int) -> np.ndarray:
    """The order `train` visits `n` samples in, in epoch `epoch` (0-based) of a run seeded `seed`.

    key = SplitMix64 folded over the seed's integers and the epoch; order = the stable argsort of
    SplitMix64(key + (i + 1) * golden) for i in [0, n): a uniformly shuffled order (the 64-bit
    hashes tie with probability ~n^2 / 2^65), the same on every platform and numpy version, and a
    different one per epoch and per seed."""
    key = np.zeros(1, np.uint64)
    for word in [*(seed if isinstance(seed, Sequence) else [seed]), epoch]:
        key = _splitmix64(key ^ np.uint64(int(word) & _M64))
    with np.errstate(over="ignore"):
        x = key + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
    return np.argsort(_splitmix64(x), kind="stable")


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


class Engine(ABC):
    """A trainer over one bundle. Not thread-safe; one per process is enough."""

    name: str = ""  # "ort-training" | "portable", as in the manifest's `engines`
    manifest: Manifest
    default_lr: float
    threads: int

    # ---------------------------------------------------------------- what an engine implements

    @abstractmethod
    def get_weights(self) -> np.ndarray:
        """A copy of the flat float32 parameter vector (manifest order)."""

    @abstractmethod
    def set_weights(self, flat: np.ndarray) -> None:
        """Load a flat parameter vector; optimizer state and buffers are kept."""

    @abstractmethod
    def _begin_train(self, lr: float, mu: float) -> None:
        """Switch to training mode with this learning rate; on a proximal bundle, anchor the
        proximal term at the current weights with this μ (ignored otherwise: μ is 0 there)."""

    @abstractmethod
    def _train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on one batch; returns the batch's mean loss."""

    @abstractmethod
    def _eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """(mean loss, model output) of one batch in eval mode."""

    @abstractmethod
    def export_inference_model(self, path: str | Path) -> None:
        """Write a forward-only ONNX model with the current weights."""

    # ---------------------------------------------------------------- shared by every engine

    def train(
        self,
        data: Dataset,
        batch_size: int,
        epochs: int = 1,
        max_steps: int | None = None,
        seed: int | Sequence[int] = 0,
        lr: float | None = None,
        mu: float = 0.0,
        service: Callable[[], None] | None = None,
    ) -> TrainResult:
        """Shuffled mini-batch training; returns the sample-weighted mean training (data) loss.
        `mu`: FedProx's proximal weight, anchored at the weights this call starts from.
        `service`: called after each step (a lone device serves its connection there, at most
        once a second, so a long training does not cost its keepalive: device/host.py)."""
        if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
            raise ValueError(f"proximal mu must be a finite number >= 0, got {mu!r}")
        if mu > 0 and not self.manifest.proximal:
            raise BundleError(
                f"bundle {self.manifest.model_name} has no proximal term (exported without FedProx); cannot train with mu {mu:g}"
            )
        self._begin_train(self.default_lr if lr is None else lr, float(mu))
        n = len(data)
        steps, loss_sum, seen = 0, 0.0, 0
        start = time.perf_counter()
        for epoch in range(epochs):
            order = epoch_order(seed, epoch, n)
            for lo in range(0, n, batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                idx = order[lo : lo + batch_size]
                loss = self._train_step(data.x[idx], data.y[idx])
                loss_sum += loss * len(idx)
                seen += len(idx)
                steps += 1
                if service is not None:
                    service()
        seconds = time.perf_counter() - start
        return TrainResult(steps=steps, samples=n, mean_loss=loss_sum / max(seen, 1), seconds=seconds)

    def evaluate(self, data: Dataset, batch_size: int = 256) -> EvalResult:
        """Loss plus the task's metric (MSE for regression, accuracy for classification)."""
        n = len(data)
        task = self.manifest.task
        loss_sum, sq_sum, correct = 0.0, 0.0, 0
        for lo in range(0, n, batch_size):
            x, y = data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]
            loss, pred = self._eval_batch(x, y)
            loss_sum += loss * len(x)
            if pred is None:
                continue
            if task == "regression":
                sq_sum += float(np.sum((pred.reshape(y.shape).astype(np.float64) - y) ** 2))
            elif task == "classification":
                correct += int(np.sum(np.argmax(pred, axis=-1) == y))
            else:  # binary, logits
                correct += int(np.sum((pred.reshape(y.shape) > 0) == (y > 0.5)))
        per_sample = max(1, int(np.prod(self.manifest.output_shape)))
        if task == "regression":
            return EvalResult(loss=loss_sum / n, mse=sq_sum / (n * per_sample))
        return EvalResult(loss=loss_sum / n, accuracy=correct / (n * (1 if task == "classification" else per_sample)))

"""Built-in models: a registry from name to factory, per-sample input shape, task and default loss.

The factories build plain `nn.Sequential` models so the parameter names are `0.weight`, `0.bias`, ...
(the names that appear in the manifest and in the ONNX files). torch is imported inside the
factories: `fleetlearn export --help` must not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BuiltinModel:
    """One entry of the registry."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    task: str  # "regression" | "classification" | "binary"
    loss: str  # default loss for the task
    description: str


def boston_mlp() -> nn.Module:
    """The reference tutorial's Boston housing regressor: 13-32-24-16-1 with ReLU (1657 parameters)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(13, 32), nn.ReLU(),
        nn.Linear(32, 24), nn.ReLU(),
        nn.Linear(24, 16), nn.ReLU(),
        nn.Linear(16, 1),
    )  # fmt: skip


def digits_mlp() -> nn.Module:
    """A classifier for scikit-learn's 8x8 digits, flattened to 64 inputs: 64-64-32-10 with ReLU."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


def digits_cnn() -> nn.Module:
    """A small CNN for the 8x8 digits as images (1, 8, 8).

    It exists to prove that more than MLPs export and train on device: a convolution, batch
    normalisation (whose running statistics are frozen buffers, not federated), pooling and dropout.
    """
    from torch import nn

    return nn.Sequential(
        # No bias: batch norm subtracts the mean right after, so a conv bias would be a parameter
        # with zero gradient (AdamW then amplifies rounding noise into steps).
        nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False),  # 16 x 8 x 8
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        m.name: m
        for m in (
            BuiltinModel("boston-mlp", boston_mlp, (13,), "regression", "mse",
                         "Boston housing regressor, 13-32-24-16-1 ReLU MLP"),
            BuiltinModel("digits-mlp", digits_mlp, (64,), "classification", "cross_entropy",
                         "8x8 digits classifier, 64-64-32-10 ReLU MLP, 10 classes"),
            BuiltinModel("digits-cnn", digits_cnn, (1, 8, 8), "classification", "cross_entropy",
                         "8x8 digits classifier: Conv2d, BatchNorm2d, ReLU, MaxPool2d, Dropout, Linear"),
        )
    }
)  # fmt: skip

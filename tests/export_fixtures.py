"""Model factories for the export tests, importable as `tests.export_fixtures:NAME`.

Some are deliberately broken: each one is a bad input that `fleetlearn export` must refuse
with a one-line reason.
"""

from __future__ import annotations

import torch
from torch import nn


def returns_int():
    """Not a model at all."""
    return 42


def raises():
    raise RuntimeError("factory exploded on purpose")


def no_params() -> nn.Module:
    """Runs, exports, but has nothing to train."""
    return nn.Sequential(nn.ReLU(), nn.Flatten())


class _Then(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x))


def untrainable_op() -> nn.Module:
    """Exports fine (ONNX Round), but ORT has no gradient for Round."""
    return _Then(torch.round)


def unexportable_op() -> nn.Module:
    """torch.onnx (TorchScript exporter, opset 17) has no symbolic for aten::sinh."""
    return _Then(torch.sinh)


def binary_mlp() -> nn.Module:
    """4 features -> one logit, for bce_with_logits."""
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class _Reordered(nn.Module):
    """Registers its layers in the opposite order of use, and has a frozen layer in the middle.

    So named_parameters() order, forward order and alphabetical order all differ: the manifest's
    order must come from ORT, not from any of them by assumption.
    """

    def __init__(self):
        super().__init__()
        self.z_out = nn.Linear(6, 2)
        self.m_mid = nn.Linear(5, 6)
        self.a_in = nn.Linear(4, 5)
        for p in self.m_mid.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.z_out(torch.relu(self.m_mid(torch.relu(self.a_in(x)))))


def reordered() -> nn.Module:
    return _Reordered()


def bn_cnn() -> nn.Module:
    """digits-cnn without dropout: deterministic, so its training can be compared with torch.

    No conv bias: batch norm cancels it, so its true gradient is 0 and AdamW would turn the
    float32 rounding noise of the two frameworks into full-size (and different) steps.
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


def layernorm_mlp() -> nn.Module:
    """LayerNorm needs an export repair (ORT's gradient reads optional outputs torch omits)."""
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def groupnorm_cnn() -> nn.Module:
    """GroupNorm exports as InstanceNormalization, which has no gradient in ORT 1.19.2."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(256, 10))

"""Optimizer configuration, and how each choice maps onto an ONNX Runtime optimizer kernel exactly.

ORT 1.19.2 has two on-device optimizer kernels:

* `AdamWOptimizer` (com.microsoft). With `adam_mode=0` it is `torch.optim.AdamW` step for step:
  decoupled decay `w -= lr*wd*w` first, then the `m, v` updates, then
  `w -= lr * m / (bc1 * (sqrt(v / bc2) + eps))` (bias corrections on m and v separately, eps
  added after). ORT's ready-made `onnxblock.optim.AdamW` hard-codes `adam_mode=1` (Hugging Face:
  eps added to the uncorrected sqrt(v), decay applied after the update), which is NOT torch's
  AdamW, so we build the node ourselves (`fleetlearn.export.ort_blocks`). The kernel insists on
  `correct_bias=1` in mode 0.
* `SGDOptimizerV2`: `w -= lr * g`, no momentum and no weight decay.

`torch.optim.SGD` with momentum mu (dampening 0, not Nesterov, no weight decay) is still matched
exactly, through the AdamW kernel in `adam_mode=1` without bias correction, beta1 = mu,
beta2 = 1, eps = 1 - mu and weight decay 0: its second moment stays exactly 0
(v = 1*v + 0*g*g), so the denominator is the constant eps; its first moment m = mu*m + (1-mu)*g
is (1-mu) times torch's buffer b = mu*b + g (both start at 0, and torch's first b = g agrees),
so the update w -= lr * m / (1-mu) is torch's w -= lr * b.

SGD weight decay (torch's coupled L2: g + wd*w) has no exact kernel: SGDOptimizerV2 has none,
AdamW mode 1 decays after the update (w - lr*g)(1 - lr*wd) (off by lr^2*wd*g per step), and
mode 0, which decays first, requires bias correction, which divides by 1 - beta2^t = 0 when
beta2 = 1. So it is refused; use adamw (decoupled decay) instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetlearn.export.errors import UsageError

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "sgd")

# torch's own defaults, so `--optimizer adamw` with no other flag equals `torch.optim.AdamW(params)`.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "momentum": None},
    "sgd": {"lr": 1e-3, "weight_decay": 0.0, "betas": None, "eps": None, "momentum": 0.0},
}


@dataclass(frozen=True)
class KernelSpec:
    """The ORT optimizer node that implements a config: op type plus its attributes."""

    op_type: str  # "AdamWOptimizer" | "SGDOptimizerV2"
    attributes: dict[str, float | int]


@dataclass(frozen=True)
class OptimizerConfig:
    """A validated optimizer choice. Build it with `OptimizerConfig.create`."""

    name: str
    lr: float
    weight_decay: float
    betas: tuple[float, float] | None = None  # adamw only
    eps: float | None = None  # adamw only
    momentum: float | None = None  # sgd only

    @classmethod
    def create(
        cls,
        name: str,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        betas: Iterable[float] | None = None,
        eps: float | None = None,
        momentum: float | None = None,
    ) -> OptimizerConfig:
        """Fill torch's defaults for what is not given and validate. Raises UsageError (one line)."""
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}; one of: {', '.join(OPTIMIZERS)}")
        d = _DEFAULTS[name]
        if name == "sgd":
            if betas is not None:
                raise UsageError("betas apply to adamw only, not sgd")
            if eps is not None:
                raise UsageError("eps applies to adamw only, not sgd")
        elif momentum is not None:
            raise UsageError("momentum applies to sgd only; adamw's momentum is beta1 (--betas)")
        cfg = cls(
            name=name,
            lr=_number("learning rate", d["lr"] if lr is None else lr, positive=True),
            weight_decay=_number("weight decay", d["weight_decay"] if weight_decay is None else weight_decay),
            betas=None if name == "sgd" else _betas(d["betas"] if betas is None else betas),
            eps=None if name == "sgd" else _number("eps", d["eps"] if eps is None else eps, positive=True),
            momentum=None if name == "adamw" else _unit("momentum", d["momentum"] if momentum is None else momentum),
        )
        cfg.kernel()  # refuses the combinations no kernel can do exactly
        return cfg

    def kernel(self) -> KernelSpec:
        """The ORT kernel and attributes that reproduce this torch optimizer exactly."""
        if self.name == "adamw":
            assert self.betas is not None and self.eps is not None
            return KernelSpec("AdamWOptimizer", {
                "alpha": self.betas[0], "beta": self.betas[1], "epsilon": self.eps,
                "weight_decay": self.weight_decay, "correct_bias": 1, "adam_mode": 0,
            })  # fmt: skip
        if self.weight_decay != 0.0:
            raise UsageError(
                "sgd weight decay cannot be reproduced exactly by onnxruntime-training's optimizer kernels "
                "(SGDOptimizerV2 has none; AdamW's decay is decoupled); use --optimizer adamw --weight-decay instead"
            )
        mu = self.momentum or 0.0
        if mu == 0.0:
            return KernelSpec("SGDOptimizerV2", {})
        # The kernel computes 1.f - alpha in float32; give eps that same float32 value so that
        # m / eps is exactly torch's momentum buffer (see the module docstring).
        return KernelSpec("AdamWOptimizer", {
            "alpha": mu, "beta": 1.0, "epsilon": float(_f32(1.0) - _f32(mu)),
            "weight_decay": 0.0, "correct_bias": 0, "adam_mode": 1,
        })  # fmt: skip

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `optimizer` object. A device only needs `lr` (set with set_learning_rate)."""
        kernel = self.kernel()
        doc: dict[str, Any] = {"name": self.name, "lr": self.lr}
        if self.name == "adamw":
            assert self.betas is not None
            doc.update(betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay, adam_mode="torch")
        else:
            doc.update(momentum=self.momentum, weight_decay=self.weight_decay, dampening=0.0, nesterov=False)
        doc["ort_op"] = kernel.op_type
        return doc

    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The PyTorch optimizer this config reproduces (what the parity tests compare against)."""
        import torch

        if self.name == "adamw":
            assert self.betas is not None and self.eps is not None
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum or 0.0, weight_decay=self.weight_decay)


def _f32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def _number(what: str, value: Any, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise UsageError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _unit(what: str, value: Any) -> float:
    v = _number(what, value)
    if v >= 1.0:
        raise UsageError(f"{what} must be in [0, 1), got {value!r}")
    return v


def _betas(value: Iterable[float]) -> tuple[float, float]:
    try:
        b = tuple(value)
    except TypeError:
        raise UsageError(f"betas must be two numbers B1,B2, got {value!r}") from None
    if len(b) != 2:
        raise UsageError(f"betas must be two numbers B1,B2, got {len(b)} value(s)")
    return (_unit("beta1", b[0]), _unit("beta2", b[1]))

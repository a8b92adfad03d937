"""The losses a bundle can train with, and whether one fits a model's output.

Pure data and checks (no torch/onnx), so the CLI and the Python API validate before exporting.
The ONNX side of each loss is in `fleetlearn.export.ort_blocks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fleetlearn.export.errors import UsageError


@dataclass(frozen=True)
class LossSpec:
    name: str
    task: str  # the task this loss implies; recorded in the manifest
    label_name: str  # graph input name of the label in training_model.onnx / eval_model.onnx
    label_dtype: str  # "float32" | "int64"
    description: str


LOSSES: Mapping[str, LossSpec] = MappingProxyType(
    {
        "mse": LossSpec("mse", "regression", "target", "float32", "mean squared error; label has the output's shape"),
        "cross_entropy": LossSpec(
            "cross_entropy", "classification", "labels", "int64",
            "softmax cross entropy over logits (batch, C); label is the class index, shape (batch,)",
        ),
        "bce_with_logits": LossSpec(
            "bce_with_logits", "binary", "target", "float32",
            "binary cross entropy on logits; label in [0, 1] with the output's shape",
        ),
    }
)  # fmt: skip


def loss_spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}; one of: {', '.join(LOSSES)}") from None


def label_shape(loss: LossSpec, output_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample label shape for `loss` given the model's per-sample output shape.

    Raises UsageError when the loss does not fit the output, e.g. cross_entropy on a single output.
    """
    if loss.name == "cross_entropy":
        if len(output_shape) != 1:
            raise UsageError(
                f"loss cross_entropy needs an output of shape (batch, C), but the model outputs "
                f"{_fmt(output_shape)}; flatten the logits or choose another loss"
            )
        if output_shape[0] < 2:
            raise UsageError(
                f"loss cross_entropy needs at least 2 class logits, but the model outputs (batch, {output_shape[0]}); "
                "use mse for regression or bce_with_logits for a single binary logit"
            )
        return ()
    # mse and bce_with_logits compare element-wise: the label is built with exactly the output's shape
    # (ORT's loss blocks create the label input "like" the output), so they fit any float output.
    return tuple(output_shape)


def task_for(loss: LossSpec, task: str | None) -> str:
    """The manifest's task: implied by the loss; an explicit task must agree with it."""
    if task is not None and task != loss.task:
        raise UsageError(f"task {task!r} does not match loss {loss.name!r} (which implies task {loss.task!r})")
    return loss.task


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(["batch", *map(str, shape)]) + ")"

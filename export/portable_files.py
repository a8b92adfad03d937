"""Write the portable engine's files into a staged bundle and describe them for the manifest.

Files: `step_model.onnx` (one training step), `portable_eval_model.onnx` (loss and output) and
`initial_state.f32` (the flat parameters, then the flat buffers: raw little-endian float32).
The graphs are built by `fleetlearn.export.step_graph`; here they are saved and run once on a
dummy batch with a plain InferenceSession, as a device would, so a bundle that exports but
cannot run is caught now.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetlearn.export._errtext import one_line
from fleetlearn.export._native_io import quiet_native_output
from fleetlearn.export.errors import ExportError

if TYPE_CHECKING:
    import torch

    from fleetlearn.export.losses import LossSpec
    from fleetlearn.export.onnx_export import ExportedModel
    from fleetlearn.export.optimizers import OptimizerConfig
    from fleetlearn.export.ort_probe import ParamSlot

STEP_FILE = "step_model.onnx"
EVAL_FILE = "portable_eval_model.onnx"
STATE_FILE = "initial_state.f32"


def write_portable(
    model: torch.nn.Module,
    stage: Path,
    slots: Sequence[ParamSlot],
    exported: ExportedModel,
    spec: LossSpec,
    labels: tuple[int, ...],
    optimizer: OptimizerConfig,
    proximal: bool = False,
) -> dict[str, Any]:
    """Build, write and smoke-run the portable graphs; return the manifest's `portable` section.

    The returned dict carries the written file names under `_files` (the caller pops it).
    """
    import onnx

    from fleetlearn.export.onnx_export import INPUT_NAME, OUTPUT_NAME
    from fleetlearn.export.step_graph import MAX_IR_VERSION, STEP_OPSET, build_portable

    order = [(s.name, tuple(s.shape), s.offset, s.size) for s in slots]
    graphs = build_portable(
        model, order, spec.name, optimizer, exported.input_shape, labels, spec.label_dtype,
        INPUT_NAME, spec.label_name, OUTPUT_NAME, proximal,
    )  # fmt: skip
    onnx.save(graphs.step, stage / STEP_FILE)
    onnx.save(graphs.eval, stage / EVAL_FILE)
    params = np.concatenate([exported.trainable[s.name].ravel() for s in slots]).astype("<f4")
    state = np.concatenate([params, graphs.initial_buffers.astype("<f4")])
    (stage / STATE_FILE).write_bytes(state.tobytes())
    section = {
        "step_model": STEP_FILE,
        "eval_model": EVAL_FILE,
        "initial_state": STATE_FILE,
        "onnx": {"ir_version": min(graphs.step.ir_version, MAX_IR_VERSION), "opset": STEP_OPSET},
        "optimizer_state": list(graphs.state_names),
        "buffers": [{"name": b.name, "shape": list(b.shape), "offset": b.offset, "size": b.size} for b in graphs.buffers],
        "num_buffers": int(graphs.initial_buffers.size),
        "dropout": graphs.has_dropout,
        "_files": [STEP_FILE, EVAL_FILE, STATE_FILE],
    }
    _smoke(stage, section, params, graphs.initial_buffers, exported, spec, labels, optimizer.lr, proximal)
    return section


def _smoke(
    stage: Path,
    section: dict,
    params: np.ndarray,
    buffers: np.ndarray,
    exported: ExportedModel,
    spec: LossSpec,
    labels: tuple[int, ...],
    lr: float,
    proximal: bool = False,
) -> None:
    """Two steps (batches of 4 and 3) and one eval with onnxruntime's plain InferenceSession."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    state: dict[str, np.ndarray] = {"params": params, "buffers": buffers}
    for name in section["optimizer_state"]:
        state[name] = np.zeros((), np.float32) if name == "adam_step" else np.zeros_like(params)
    try:
        with quiet_native_output():
            step = ort.InferenceSession(str(stage / STEP_FILE), providers=["CPUExecutionProvider"])
            evaluate = ort.InferenceSession(str(stage / EVAL_FILE), providers=["CPUExecutionProvider"])
            for batch in (4, 3):
                x = rng.standard_normal((batch, *exported.input_shape)).astype(np.float32)
                if spec.label_dtype == "int64":
                    y = rng.integers(0, max(exported.output_shape[-1], 1), size=(batch, *labels)).astype(np.int64)
                else:
                    y = rng.random((batch, *labels)).astype(np.float32)
                feed = {**state, "input": x, spec.label_name: y, "lr": np.asarray(lr, np.float32)}
                if proximal:  # FedProx's inputs: w_g = the initial weights, mu = 0.1
                    feed.update(global_params=params, mu=np.asarray(0.1, np.float32))
                outs = step.run(None, feed)
                names = [o.name for o in step.get_outputs()]
                loss = outs[0]
                for name, value in zip(names[1:], outs[1:]):
                    state[name.removesuffix("_out")] = value
            eval_loss, out = evaluate.run(
                None, {"params": state["params"], "buffers": state["buffers"], "input": x, spec.label_name: y}
            )
    except Exception as exc:
        raise ExportError(f"the portable step graph fails in onnxruntime: {one_line(exc)}") from exc
    if np.shape(loss) != () or not np.isfinite(loss) or not np.isfinite(eval_loss):
        raise ExportError("the portable step graph gives a non-finite or non-scalar loss on a dummy batch")
    if out.shape != (x.shape[0], *exported.output_shape):
        raise ExportError(
            f"the portable eval graph's output has shape {out.shape}, expected {(x.shape[0], *exported.output_shape)}"
        )
    if state["params"].shape != params.shape or not np.isfinite(state["params"]).all():
        raise ExportError("the portable step graph does not return finite parameters of the manifest's size")

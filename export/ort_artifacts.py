"""Run `onnxruntime.training.artifacts.generate_artifacts` and repair what it gets wrong for us.

Writes training_model.onnx, eval_model.onnx, optimizer_model.onnx and checkpoint into a directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fleetlearn.export._errtext import one_line
from fleetlearn.export._native_io import quiet_native_output
from fleetlearn.export.errors import ExportError
from fleetlearn.export.onnx_export import OUTPUT_NAME, ExportedModel
from fleetlearn.export.optimizers import KernelSpec

ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")

_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (\S*)")


def generate(exported: ExportedModel, loss: str, kernel: KernelSpec, out_dir: Path, proximal: bool = False) -> None:
    """Generate the ORT training artifacts for `exported` into `out_dir`. Raises ExportError (one line).

    `proximal`: add FedProx's term mu/2 ||w - w_g||^2 to the training loss (export/ort_proximal.py).
    """
    import onnx
    from onnxruntime.training import artifacts
    from onnxruntime.training.onnxblock import _graph_utils

    from fleetlearn.export import ort_blocks

    # onnxblock names every node it adds from a process-wide counter. Reset it so that the same
    # model exported twice in one process gives byte-identical files (and the same model_hash).
    if hasattr(_graph_utils, "_GRAPH_TOKEN"):
        _graph_utils._GRAPH_TOKEN = 0
    loss_arg = ort_blocks.loss_block(loss)
    if proximal:
        from fleetlearn.export.ort_proximal import ProximalLoss

        params = [(name, tuple(np.shape(value))) for name, value in exported.trainable.items()]
        loss_arg = ProximalLoss(ort_blocks.loss_block(loss, as_block=True), params)
    try:
        with quiet_native_output():
            artifacts.generate_artifacts(
                exported.training_graph,
                requires_grad=list(exported.trainable),
                frozen_params=list(exported.frozen),
                loss=loss_arg,
                optimizer=ort_blocks.optimizer_block(kernel),
                artifact_directory=out_dir,
                additional_output_names=[OUTPUT_NAME],  # eval steps return (loss, output)
            )
    except Exception as exc:
        raise ExportError(_explain(exc)) from exc
    # generate_artifacts adds the extra output to both graphs. Only evaluation needs it (for
    # accuracy); returning it from every training step nearly doubled the step time of the
    # Boston MLP (95 -> 54 us measured), so the training graph returns the loss alone.
    train_path = out_dir / "training_model.onnx"
    training_model = onnx.load(train_path)
    if _drop_graph_output(training_model, OUTPUT_NAME):
        onnx.save(training_model, train_path)
    eval_path = out_dir / "eval_model.onnx"
    eval_model = onnx.load(eval_path)
    from fleetlearn.export.ort_proximal import strip_from_eval

    stripped = strip_from_eval(eval_model)  # evaluation reports the data loss, needs no w_g or mu
    if _repair_eval_model(eval_model) or stripped:
        onnx.save(eval_model, eval_path)


def _drop_graph_output(model, name: str) -> bool:
    """Remove `name` from the graph's outputs (its node stays: the loss still reads it)."""
    keep = [o for o in model.graph.output if o.name != name]
    if len(keep) == len(model.graph.output):
        return False
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return True


def _explain(exc: Exception) -> str:
    text = str(exc)
    m = _NO_GRADIENT.search(text)
    if m:
        op, node = m.group(1), m.group(2)
        return (
            f"cannot train through op {op} (ONNX node {node}): onnxruntime-training has no gradient for it; "
            "replace it with a differentiable op or move it out of the path from the parameters to the loss"
        )
    return f"onnxruntime-training cannot build the training graph: {one_line(exc)}"


def _repair_eval_model(model) -> bool:
    """Make ORT's eval graph valid and quiet. Returns True if it changed anything.

    ORT derives the eval graph from the training-mode graph by flipping BatchNormalization's
    `training_mode` to 0 and unhooking Dropout's training flag, but it leaves BatchNormalization's
    two running-statistics outputs in place (ONNX allows them only in training mode, so ORT refuses
    to load the model) and leaves the flag's Constant node dangling (ORT warns about it on every load).
    """
    graph = model.graph
    changed = False

    def used_names() -> set[str]:
        return {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    for node in graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
            if mode == 0 and not any(o in used_names() for o in node.output[1:] if o):
                del node.output[1:]
                changed = True
    # Subgraphs (If/Loop bodies) may read outer names we do not see here: then leave the graph be.
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute):
        return changed
    # Drop nodes whose outputs nobody reads (only side-effect-free Constant nodes, repeatedly).
    while True:
        used = used_names()
        dead = [n for n in graph.node if n.op_type == "Constant" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        changed = True
    return changed

"""PyTorch module -> two ONNX forward graphs: a training-mode one (for ORT's artifact generator)
and an eval-mode one (`model.onnx`, plain inference). Plus the facts the manifest needs.

Why the legacy TorchScript exporter (`dynamo=False`): it supports `TrainingMode.TRAINING`
(dropout and batch norm stay in training mode, which is what on-device training must run) and
keeps parameter names as initializer names when constant folding is off, so ONNX names are
`state_dict` names. Opset 17 / IR 8 is read by onnxruntime-training 1.19.2 (IR <= 10).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetlearn.export._errtext import one_line
from fleetlearn.export._native_io import quiet_native_output
from fleetlearn.export.errors import ExportError

if TYPE_CHECKING:
    import onnx
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17
MAX_IR_VERSION = 10  # what onnxruntime-training 1.19.2 reads


@dataclass(frozen=True)
class ExportedModel:
    training_graph: onnx.ModelProto  # forward graph, dropout/batch norm in training mode
    inference_graph: onnx.ModelProto  # forward graph in eval mode: written as model.onnx
    input_shape: tuple[int, ...]  # per sample
    output_shape: tuple[int, ...]  # per sample
    trainable: dict[str, np.ndarray]  # name -> initial value (float32), torch's named_parameters order
    frozen: tuple[str, ...]  # graph initializers that are parameters/buffers but not trained
    dropped: tuple[str, ...]  # buffers the exporter left out of the graph (e.g. num_batches_tracked)
    opset: int
    ir_version: int


def export_model(model: torch.nn.Module, input_shape: tuple[int, ...], *, opset: int = OPSET) -> ExportedModel:
    """Export `model` for per-sample inputs of `input_shape`. Raises ExportError (one line) on failure.

    The caller's module is not modified: we export a deep copy, and restore its state after the
    training-mode trace (which runs batch norm in training mode and so updates running statistics).
    """
    import torch

    try:
        model = copy.deepcopy(model).cpu()
    except Exception as exc:
        raise ExportError(f"cannot copy the model for export ({type(exc).__name__}: {one_line(exc)})") from exc
    trainable_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable_params:
        raise ExportError("the model has no trainable parameters (nothing to train or federate)")
    for name, p in trainable_params:
        if p.dtype != torch.float32:
            raise ExportError(f"parameter {name!r} is {p.dtype}, but bundles train float32 only; call model.float()")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    output_shape = _probe_output_shape(model, input_shape)
    training_graph = _export(model, input_shape, opset, torch.onnx.TrainingMode.TRAINING)
    model.load_state_dict(snapshot)
    inference_graph = _export(model, input_shape, opset, torch.onnx.TrainingMode.EVAL)
    model.load_state_dict(snapshot)
    _name_layer_norm_statistics(training_graph)
    for graph in (training_graph, inference_graph):
        _restore_initializers(graph, snapshot)
        if graph.ir_version > MAX_IR_VERSION:
            raise ExportError(
                f"the exported ONNX has IR version {graph.ir_version}; onnxruntime-training reads <= {MAX_IR_VERSION} "
                "(is onnx newer than the pinned 1.17.0?)"
            )

    initializers = {init.name for init in training_graph.graph.initializer}
    missing = [n for n, _ in trainable_params if n not in initializers]
    if missing:
        raise ExportError(
            f"trainable parameter(s) {', '.join(missing[:5])} are not in the exported graph (unused by forward(), "
            "or used in a way the exporter folded away); remove them or set requires_grad=False"
        )
    trainable_names = {n for n, _ in trainable_params}
    stateful = [n for n, _ in model.named_parameters() if n not in trainable_names] + [n for n, _ in model.named_buffers()]
    frozen = tuple(n for n in stateful if n in initializers)
    dropped = tuple(n for n in stateful if n not in initializers)
    return ExportedModel(
        training_graph=training_graph,
        inference_graph=inference_graph,
        input_shape=tuple(input_shape),
        output_shape=output_shape,
        trainable={n: p.detach().numpy().astype(np.float32, copy=True) for n, p in trainable_params},
        frozen=frozen,
        dropped=dropped,
        opset=opset,
        ir_version=training_graph.ir_version,
    )


def _dummy(batch: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    # A private generator: the dummy batch never disturbs (or depends on) the global RNG state.
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *input_shape), generator=gen, dtype=torch.float32)


def _probe_output_shape(model: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Run the model (eval mode, no grad) on batches of 2 and 3 to learn its per-sample output shape."""
    import torch

    shapes = []
    was_training = model.training
    model.eval()
    try:
        for batch in (2, 3):
            x = _dummy(batch, input_shape)
            try:
                with torch.no_grad():
                    out = model(x)
            except Exception as exc:
                raise ExportError(
                    f"the model's forward() failed on a batch of shape {tuple(x.shape)} (is --input-shape "
                    f"{','.join(map(str, input_shape))} right?): {type(exc).__name__}: {one_line(exc)}"
                ) from exc
            if not isinstance(out, torch.Tensor):
                raise ExportError(f"the model must return one tensor, but forward() returned {type(out).__name__}")
            if out.dtype != torch.float32:
                raise ExportError(f"the model's output is {out.dtype}; losses need a float32 output")
            if out.dim() == 0 or out.shape[0] != batch:
                raise ExportError(
                    f"the model's output {tuple(out.shape)} for a batch of {batch} does not keep the batch as its first dimension"
                )
            shapes.append(tuple(out.shape[1:]))
    finally:
        model.train(was_training)
    if shapes[0] != shapes[1]:
        raise ExportError(f"the model's per-sample output shape depends on the batch size: {shapes[0]} vs {shapes[1]}")
    return shapes[0]


def _export(model: torch.nn.Module, input_shape: tuple[int, ...], opset: int, mode) -> onnx.ModelProto:
    import onnx
    import torch

    buf = io.BytesIO()
    try:
        with quiet_native_output():
            torch.onnx.export(
                model,
                (_dummy(2, input_shape),),
                buf,  # type: ignore[arg-type]  # a file-like object works with dynamo=False (torch's own docs)
                dynamo=False,
                training=mode,
                do_constant_folding=False,  # keeps every parameter as a named initializer
                export_params=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export cannot export this model: {type(exc).__name__}: {one_line(exc)}") from exc
    return onnx.load_from_string(buf.getvalue())


def _name_layer_norm_statistics(graph: onnx.ModelProto) -> None:
    """Give LayerNormalization nodes their optional Mean and InvStdDev outputs.

    ORT's gradient builder for LayerNormalization reads those two outputs, which torch's exporter
    leaves out; without them building the gradient graph fails with an opaque
    "i < node_->OutputDefs().size() was false". They are extra, otherwise unused outputs and
    ONNX allows them in any mode, so naming them changes nothing else.
    """
    taken = {name for node in graph.graph.node for name in (*node.input, *node.output)}
    for i, node in enumerate(graph.graph.node):
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            base = node.name or f"LayerNormalization_{i}"
            extra = [f"{base}.saved_mean", f"{base}.saved_inv_std_dev"]
            if not taken.intersection(extra):
                node.output.extend(extra)
                taken.update(extra)


def _restore_initializers(graph: onnx.ModelProto, snapshot: dict) -> None:
    """Put the module's pre-export values back into initializers named after state_dict entries.

    The training-mode trace runs batch norm in training mode, which updates running_mean/var before
    the exporter reads them; the bundle must carry the model as it was given.
    """
    from onnx import numpy_helper

    for i, init in enumerate(graph.graph.initializer):
        value = snapshot.get(init.name)
        if value is None:
            continue
        array = value.numpy()
        if tuple(init.dims) != array.shape:
            raise ExportError(f"exported initializer {init.name!r} has shape {tuple(init.dims)}, the model has {array.shape}")
        graph.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(_np_dtype(init.data_type)), init.name))


def _np_dtype(onnx_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(onnx_type)

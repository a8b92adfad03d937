"""onnxblock building blocks that ORT does not ship in the form we need.

* `KernelAdamW`: an optimizer block whose node is exactly an `fleetlearn.export.optimizers.KernelSpec`
  (ORT's stock `onnxblock.optim.AdamW` forces `adam_mode=1`, the Hugging Face variant).
* `StableBCEWithLogits`: ORT's stock BCEWithLogitsLoss computes log(sigmoid(x)) and log(1 - sigmoid(x)),
  which in float32 gives -inf, and then 0 * -inf = NaN, as soon as a logit passes about 17
  (sigmoid rounds to 1). That happens in ordinary training. This block computes the same loss
  through LogSoftmax over the two logits [0, x], which ORT can differentiate, is stable for any x,
  and has torch's gradient sigmoid(x) - t everywhere (including x = 0).

Importing this module imports onnx and onnxruntime's onnxblock: only the export path does.
"""

from __future__ import annotations  # noqa: I001  (the ort_api stub must precede onnxruntime.training)

import copy

import numpy as np
import onnx
from onnx import helper

# fleetlearn.edge_runtime.engines.ort_api installs its lightweight `onnxruntime.training` package stub (skips the
# torch-heavy ORTModule probe); onnxblock and artifacts import fine through it.
import fleetlearn.edge_runtime.engines.ort_api  # noqa: F401
from onnxruntime.training import artifacts, onnxblock
from onnxruntime.training.onnxblock import _graph_utils, blocks
from onnxruntime.training.onnxblock.optim import optim as _optim

from fleetlearn.export.optimizers import KernelSpec


class _KernelAdamWNode(_optim.AdamWOptimizer):
    """ORT's AdamWOptimizer node builder, with every attribute set from a KernelSpec afterwards."""

    def __init__(self, spec: KernelSpec):
        super().__init__()
        self._spec = spec

    def build(self, *input_names: str) -> str:
        output = super().build(*input_names)
        node = self.base.graph.node[-1]
        if node.op_type != "AdamWOptimizer":  # guards against a changed onnxblock internals
            raise RuntimeError(f"expected the AdamWOptimizer node last, found {node.op_type}")
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(self._spec.attributes.items()))
        return output


class KernelAdamW(onnxblock.optim.AdamW):
    """ORT's AdamW optimizer block (inputs, moments, outputs) with our node in place of its adam_mode=1 one."""

    def __init__(self, spec: KernelSpec):
        super().__init__()
        self._adamw = _KernelAdamWNode(spec)


def optimizer_block(spec: KernelSpec) -> onnxblock.Block:
    """The optimizer argument for generate_artifacts."""
    if spec.op_type == "SGDOptimizerV2":
        return onnxblock.optim.SGD()
    if spec.op_type == "AdamWOptimizer":
        return KernelAdamW(spec)
    raise ValueError(f"no optimizer block for {spec.op_type}")


class StableBCEWithLogits(blocks.Block):
    """mean(-(t * log sigmoid(x) + (1 - t) * log(1 - sigmoid(x)))), computed stably (see module doc)."""

    def build(self, logits_name: str, target_name: str = "target") -> str:
        graph = self.base.graph
        if not _graph_utils.node_arg_exists(self.base, target_name):
            target = copy.deepcopy(_graph_utils.get_output_from_output_name(self.base, logits_name))
            target.name = target_name
            graph.input.append(target)

        def name(token: str) -> str:
            return _graph_utils.generate_graph_name(f"bce.{token}")

        axes, zero, one = name("axes"), name("zero"), name("one")
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), axes),
            onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), zero),
            onnx.numpy_helper.from_array(np.array(1.0, dtype=np.float32), one),
        ])  # fmt: skip
        x1, z1, pair, logp = name("x1"), name("z1"), name("pair"), name("logp")
        lneg1, lpos1, lneg, lpos = name("lneg1"), name("lpos1"), name("lneg"), name("lpos")
        one_minus_t, a, b, s, per_elem, loss = (name(t) for t in ("omt", "a", "b", "sum", "elem", "loss"))
        graph.node.extend([
            helper.make_node("Unsqueeze", [logits_name, axes], [x1]),
            # 0 * x rather than a constant: keeps the shape (any batch) with no Shape op on the grad path.
            helper.make_node("Mul", [x1, zero], [z1]),
            helper.make_node("Concat", [z1, x1], [pair], axis=-1),
            # log softmax([0, x]) = [log(1 - sigmoid(x)), log sigmoid(x)], max-subtracted inside the op.
            helper.make_node("LogSoftmax", [pair], [logp], axis=-1),
            helper.make_node("Split", [logp], [lneg1, lpos1], axis=-1),
            helper.make_node("Squeeze", [lneg1, axes], [lneg]),
            helper.make_node("Squeeze", [lpos1, axes], [lpos]),
            helper.make_node("Sub", [one, target_name], [one_minus_t]),
            helper.make_node("Mul", [one_minus_t, lneg], [a]),
            helper.make_node("Mul", [target_name, lpos], [b]),
            helper.make_node("Add", [a, b], [s]),
            helper.make_node("Neg", [s], [per_elem]),
            helper.make_node("ReduceMean", [per_elem], [loss], keepdims=0),
        ])  # fmt: skip
        return loss


def loss_block(loss_name: str, as_block: bool = False):
    """The loss argument for generate_artifacts (`as_block`: a Block instance, not ORT's enum,
    for wrapping in another block; the enum maps to these same default-constructed blocks)."""
    if loss_name == "mse":
        return onnxblock.loss.MSELoss() if as_block else artifacts.LossType.MSELoss
    if loss_name == "cross_entropy":
        return onnxblock.loss.CrossEntropyLoss() if as_block else artifacts.LossType.CrossEntropyLoss
    if loss_name == "bce_with_logits":
        return StableBCEWithLogits()
    raise ValueError(loss_name)

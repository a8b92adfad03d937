"""FedProx's proximal term in the onnxruntime-training graphs (Li et al. 2020, "Federated
Optimization in Heterogeneous Networks", eq. 2).

A device minimises h(w) = loss(w) + mu/2 * ||w - w_g||^2, with w_g the global model the round
started from. The term is added to the loss inside `training_model.onnx`, so ORT's own autodiff
gives the gradient g + mu*(w - w_g) and the (unchanged) optimizer graph applies torch's update to
it: exactly what `torch.optim.*` does for a torch model whose loss has the same term added.

Graph inputs added to the training model (after the input and the label):

    global.<param name>   float32, the parameter's shape: w_g's slice for that tensor
    mu                    float32 [] (mu = 0 gives the old gradient exactly: g + 0*(w - w_g) = g)

One input per trainable tensor rather than one flat vector: the flat order is measured from the
artifacts after they are built (ort_probe), so the graph cannot slice a flat input by offsets it
does not know yet; the device splits its flat w_g by the manifest's `params` instead (views, no copy).

Outputs: the training model returns (objective, loss): the first is what ORT differentiates, the
second the data loss a device reports (so train_loss means the same with and without FedProx).
The eval model is derived from the same forward graph; `strip_from_eval` removes the term, its
inputs and the objective output again, so evaluation is (loss, output) as before.
"""

from __future__ import annotations  # noqa: I001  (the ort_api stub must precede onnxruntime.training)

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

# The stub first: it keeps `import onnxruntime.training` from importing torch's ORTModule probe.
import fleetlearn.edge_runtime.engines.ort_api  # noqa: F401
from onnxruntime.training.onnxblock import blocks

PREFIX = "proximal."  # every node, value and initializer the term adds
MU = "mu"
GLOBAL = "global."  # + parameter name
OBJECTIVE = PREFIX + "objective"


class ProximalLoss(blocks.Block):
    """(loss + mu/2 * sum_i ||w_i - global.w_i||^2, loss) on top of an inner loss block."""

    def __init__(self, inner: blocks.Block, params: Iterable[tuple[str, tuple[int, ...]]]):
        super().__init__()
        self._inner = inner
        self._params = list(params)

    def build(self, *loss_inputs: str):
        loss = self._inner(*loss_inputs)
        graph = self.base.graph
        graph.input.append(helper.make_tensor_value_info(MU, TensorProto.FLOAT, []))
        half = PREFIX + "half"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), half))
        sums = []
        for i, (name, shape) in enumerate(self._params):
            g = GLOBAL + name
            graph.input.append(helper.make_tensor_value_info(g, TensorProto.FLOAT, list(shape)))
            d, sq, s = (f"{PREFIX}{t}.{i}" for t in ("diff", "sq", "sum"))
            graph.node.extend([
                helper.make_node("Sub", [name, g], [d], name=d),
                helper.make_node("Mul", [d, d], [sq], name=sq),
                helper.make_node("ReduceSum", [sq], [s], name=s, keepdims=0),
            ])  # fmt: skip
            sums.append(s)
        # A chain of Adds, not one Sum node: ORT 1.19.2 has no gradient for Sum.
        total = sums[0]
        for i, s in enumerate(sums[1:]):
            acc = f"{PREFIX}acc.{i}"
            graph.node.append(helper.make_node("Add", [total, s], [acc], name=acc))
            total = acc
        half_mu, term = PREFIX + "half_mu", PREFIX + "term"
        graph.node.extend([
            helper.make_node("Mul", [MU, half], [half_mu], name=half_mu),
            helper.make_node("Mul", [half_mu, total], [term], name=term),
            helper.make_node("Add", [loss, term], [OBJECTIVE], name=OBJECTIVE),
        ])  # fmt: skip
        return OBJECTIVE, loss


def strip_from_eval(model: onnx.ModelProto) -> bool:
    """Remove the proximal term from the eval model: its nodes, initializers, inputs and the
    objective output. Returns True when there was one to remove."""
    graph = model.graph
    if not any(o.name == OBJECTIVE for o in graph.output):
        return False
    keep_nodes = [n for n in graph.node if not n.name.startswith(PREFIX)]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    keep_init = [t for t in graph.initializer if not t.name.startswith(PREFIX)]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    keep_in = [i for i in graph.input if i.name != MU and not i.name.startswith(GLOBAL)]
    del graph.input[:]
    graph.input.extend(keep_in)
    keep_out = [o for o in graph.output if o.name != OBJECTIVE]
    del graph.output[:]
    graph.output.extend(keep_out)
    keep_vi = [v for v in graph.value_info if not v.name.startswith(PREFIX)]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return True

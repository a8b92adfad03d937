"""The portable engine's graphs: one whole training step, and evaluation, in standard ONNX.

Plain onnxruntime (no training API; aarch64 wheels exist) runs these with an InferenceSession.
The step graph (`step_model.onnx`) is

    (params[P], *optimizer state, buffers[B], input[n,...], label[n,...], lr[])
        -> (loss[], params'[P], *optimizer state', buffers'[B])

and the eval graph (`portable_eval_model.onnx`) is (params[P], buffers[B], input, label) -> (loss[], output).
`params` is the manifest's flat vector (same order and offsets as the ORT bundle), `buffers`
the float32 buffers that training mode updates (BatchNorm running statistics) concatenated in
the order of the manifest's `portable.buffers`. Optimizer state, as torch keeps it:

* adamw: `adam_m`[P], `adam_v`[P], `adam_step`[] (float32, the number of steps taken), torch.optim.AdamW:
      w *= 1 - lr*wd;  m = m + (1-b1)*(g - m);  v = b2*v + (1-b2)*g*g;  t += 1
      w -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
* sgd with momentum mu: `sgd_momentum`[P], torch.optim.SGD (dampening 0, not Nesterov):
      b = mu*b + g;  w -= lr*b          (b starts at 0, so the first step is b = g as in torch)
* sgd without momentum: no state, w -= lr*g.

Precision: float32 throughout. torch computes the bias corrections 1 - b^t in float64 on the host
and rounds the step size once; here they are float32 graph ops, which differs by a few ulp (parity
tests: ~1e-7 relative over 20 steps).

How (torch 2.13): `torch.export.export` of the model plus its loss, then the private
`torch.export.experimental._export_forward_backward` (torch is pinned; the parity tests guard it)
gives a joint forward-backward graph with one output per parameter gradient. It is decomposed to
core ATen with two extra rules: BatchNorm in training mode becomes primitive ops (onnxscript would
lower it as inference-mode BatchNormalization), and `convolution_backward` (no ONNX lowering)
becomes convolutions (`_conv_backward`). A small module that slices the flat vectors, calls the
joint graph and applies the optimizer is exported again and written with
`torch.onnx.export(dynamo=True, optimize=False)`: onnxscript's optimizer folds AdamW's `+ eps`
away (NaN at step 2), so it stays off. Opset 18 (17 gave an invalid model), IR version <= 10 so that
onnxruntime-training 1.19.2's InferenceSession reads it too.

Dropout runs onnxruntime's RandomUniformLike/Bernoulli, seeded by onnxruntime, not reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetlearn.export._errtext import one_line
from fleetlearn.export._native_io import quiet_native_output
from fleetlearn.export.errors import ExportError
from fleetlearn.export.optimizers import OptimizerConfig

if TYPE_CHECKING:
    import onnx
    import torch

STEP_OPSET = 18
MAX_IR_VERSION = 10
PARAMS, BUFFERS, LR, LOSS = "params", "buffers", "lr", "loss"
GLOBAL_PARAMS, MU = "global_params", "mu"  # FedProx's w_g [P] and mu [] (proximal bundles only)
STATE_NAMES = {"adamw": ("adam_m", "adam_v", "adam_step"), "sgd_momentum": ("sgd_momentum",), "sgd": ()}


@dataclass(frozen=True)
class BufferSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class PortableGraphs:
    step: onnx.ModelProto
    eval: onnx.ModelProto
    buffers: tuple[BufferSlot, ...]
    initial_buffers: np.ndarray  # float32, concatenated in `buffers` order
    state_names: tuple[str, ...]  # optimizer state inputs, in graph order
    has_dropout: bool


def state_kind(opt: OptimizerConfig) -> str:
    if opt.name == "adamw":
        return "adamw"
    return "sgd_momentum" if (opt.momentum or 0.0) > 0.0 else "sgd"


def torch_loss(name: str):
    import torch.nn.functional as F

    return {"mse": F.mse_loss, "cross_entropy": F.cross_entropy, "bce_with_logits": F.binary_cross_entropy_with_logits}[name]


def build_portable(
    model: torch.nn.Module,
    param_order: Sequence[tuple[str, tuple[int, ...], int, int]],  # (name, shape, offset, size), flat order
    loss: str,
    opt: OptimizerConfig,
    input_shape: tuple[int, ...],
    label_shape: tuple[int, ...],
    label_dtype: str,
    input_name: str,
    label_name: str,
    output_name: str,
    proximal: bool = False,
) -> PortableGraphs:
    """Build both graphs for `model` (not modified). Raises ExportError with a one-line reason."""
    import torch

    model = copy.deepcopy(model).cpu()
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats and mod.momentum is None:
            raise ExportError("BatchNorm with momentum=None (cumulative average) is not supported; give it a momentum")
    has_dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    named_buffers = dict(model.named_buffers())
    ldtype = torch.int64 if label_dtype == "int64" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *input_shape), generator=gen)
    y = torch.zeros((3, *label_shape), dtype=ldtype)
    loss_fn = torch_loss(loss)
    try:
        with quiet_native_output(), torch.random.fork_rng(devices=[]), _quiet_torch_loggers():
            joint, mutated = _joint_graph(model, loss_fn, x, y)
            buffers = _buffer_slots(mutated, named_buffers)
            step_module = _step_module(joint, param_order, buffers, state_kind(opt), opt, proximal)
            eval_module = _eval_module(model, param_order, buffers, loss_fn)
            n_params = sum(s[3] for s in param_order)
            n_buf = sum(b.size for b in buffers)
            flat = torch.zeros(n_params)
            bufs = torch.zeros(n_buf)
            states = [torch.zeros(n_params) if n != "adam_step" else torch.zeros(()) for n in STATE_NAMES[state_kind(opt)]]
            lr = torch.tensor(opt.lr, dtype=torch.float32)
            step_names = [PARAMS, *STATE_NAMES[state_kind(opt)], BUFFERS, input_name, label_name, LR]
            step_outs = [LOSS, *(f"{n}_out" for n in [PARAMS, *STATE_NAMES[state_kind(opt)], BUFFERS])]
            step_args: tuple = (flat, tuple(states), bufs, x, y, lr)
            if proximal:
                step_names += [GLOBAL_PARAMS, MU]
                step_args += (torch.zeros(n_params), torch.tensor(0.0))
            step = _to_onnx(step_module, step_args, step_names, step_outs, dynamic=(3, 4))
            evalg = _to_onnx(
                eval_module, (flat, bufs, x, y), [PARAMS, BUFFERS, input_name, label_name], [LOSS, output_name], dynamic=(2, 3)
            )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"cannot build the portable step graph: {type(exc).__name__}: {one_line(exc)}") from exc
    init = (
        np.concatenate([named_buffers[b.name].detach().numpy().astype(np.float32).ravel() for b in buffers])
        if buffers
        else np.zeros(0, np.float32)
    )
    return PortableGraphs(step, evalg, tuple(buffers), init, STATE_NAMES[state_kind(opt)], has_dropout)


@contextlib.contextmanager
def _quiet_torch_loggers():
    """The dynamo exporter logs through Python logging (e.g. 'torchvision is not installed'
    warnings on every export); the CLI's stderr is for one-line errors only."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ------------------------------------------------------------------ the joint forward-backward graph


def _joint_graph(model, loss_fn, x, y):
    """(joint ExportedProgram, names of the buffers training mutates)."""
    import torch
    from torch.export.experimental import _export_forward_backward

    class WithLoss(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, y):
            out = self.m(x)
            return loss_fn(out, y), out.detach()

    batch = torch.export.Dim("batch", min=1)
    wl = WithLoss(model).train()
    ep = torch.export.export(wl, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    joint = _export_forward_backward(ep, joint_loss_index=0)
    joint = joint.run_decompositions(_decompositions())
    sig = joint.graph_signature
    mutated = [name.removeprefix("m.") for name in sig.buffers_to_mutate.values()]
    return joint, mutated


def _decompositions() -> dict:
    import torch
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    table = torch.export.default_decompositions()
    table.update(
        get_decompositions(
            [
                aten._native_batch_norm_legit_functional,
                aten.native_batch_norm,
                aten._native_batch_norm_legit,
                aten._native_batch_norm_legit_no_training,
                aten.native_batch_norm_backward,
            ]
        )
    )
    table[aten.convolution_backward.default] = _conv_backward
    return table


def _conv_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask):
    """convolution_backward as plain convolutions (ONNX Conv / ConvTranspose).

    grad_input  = conv_transpose(grad_out, weight) with the forward's stride, padding, dilation, groups
                  and the output padding that restores the input's size;
    grad_weight = per group, conv(input^T, grad_out^T) with stride and dilation swapped, cut to the
                  kernel size (x^T swaps batch and channels), transposed back;
    grad_bias   = grad_out summed over every dimension but the channels.
    """
    import torch

    aten = torch.ops.aten
    if transposed:
        raise NotImplementedError("training a transposed convolution is not supported by the portable engine")
    nd = weight.dim() - 2
    kernel = list(weight.shape[2:])
    gi = gw = gb = None
    if output_mask[0]:
        out_pad = [
            inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
            for i in range(nd)
        ]
        gi = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, out_pad, groups)
    if output_mask[1]:
        cin, cout = inp.shape[1] // groups, grad_out.shape[1] // groups
        parts = []
        for g in range(groups):
            xg = inp[:, g * cin : (g + 1) * cin].transpose(0, 1)
            gg = grad_out[:, g * cout : (g + 1) * cout].transpose(0, 1)
            w = aten.convolution(xg, gg, None, list(dilation), list(padding), list(stride), False, [0] * nd, 1)
            for i in range(nd):
                w = w.narrow(2 + i, 0, kernel[i])
            parts.append(w.transpose(0, 1))
        gw = parts[0] if groups == 1 else torch.cat(parts, dim=0)
    if output_mask[2]:
        gb = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
    return gi, gw, gb


def _buffer_slots(mutated: list[str], named_buffers: dict) -> list[BufferSlot]:
    """float32 buffers that training mutates; others (num_batches_tracked) stay constants."""
    import torch

    slots, offset = [], 0
    for name in mutated:
        t = named_buffers[name]
        if t.dtype != torch.float32:
            continue
        slots.append(BufferSlot(name, tuple(t.shape), offset, t.numel()))
        offset += t.numel()
    return slots


# ------------------------------------------------------------------ the modules that get exported


def _views(flat, slots):
    return [flat[off : off + size].view(shape) for (_, shape, off, size) in slots]


def _step_module(joint, param_order, buffers, kind, opt, proximal=False):
    """The module exported as the step graph (defined here: torch is imported lazily).

    With `proximal` it also takes FedProx's w_g (`global_params`, flat) and `mu`, and steps on
    the gradient of loss + mu/2 ||w - w_g||^2, i.e. g + mu*(w - w_g) (Li et al. 2020, eq. 2);
    `loss` stays the data loss. mu = 0 leaves g exactly as it was (g + 0 = g).
    """
    import torch

    buffer_slots = [(b.name, b.shape, b.offset, b.size) for b in buffers]

    class Step(torch.nn.Module):
        def forward(self, params, states, bufs, x, y, lr, global_params=None, mu=None):
            views = dict(zip((s[0] for s in param_order), _views(params, param_order)))
            bviews = dict(zip((b.name for b in buffers), _views(bufs, buffer_slots)))
            new_bufs: dict[str, Any] = {}
            loss, grads = _call_joint(joint, views, bviews, new_bufs, x, y)
            g = torch.cat([grads[name].reshape(-1) for name, *_ in param_order])
            if proximal:
                g = g + mu * (params - global_params)
            new_params, new_states = _optimizer_step(kind, opt, params, g, states, lr)
            nb = [new_bufs.get(b.name, bviews[b.name]).reshape(-1) for b in buffers]
            new_buf = torch.cat(nb) if nb else bufs * 1.0  # a fresh output even when there are no buffers
            return (loss, new_params, *new_states, new_buf)

    return Step()


def _call_joint(joint, views, bviews, new_bufs, x, y):
    """Run the joint graph with parameters/buffers replaced by slices of the flat inputs."""

    sig = joint.graph_signature
    args = []
    for spec in sig.input_specs:
        target = spec.target.removeprefix("m.") if spec.target else None
        if spec.kind.name == "PARAMETER":
            args.append(views[target] if target in views else joint.state_dict[spec.target])
        elif spec.kind.name == "BUFFER":
            args.append(
                bviews[target]
                if target in bviews
                else (joint.state_dict.get(spec.target) if spec.target in joint.state_dict else joint.constants[spec.target])
            )
        elif spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            args.append(joint.constants[spec.target])
        else:  # USER_INPUT, in order x, y
            args.append(None)
    users = iter((x, y))
    args = [next(users) if a is None else a for a in args]
    outs = joint.graph_module(*args)
    loss, grads = None, {}
    for spec, value in zip(sig.output_specs, outs):
        kind = spec.kind.name
        if kind == "BUFFER_MUTATION":
            new_bufs[spec.target.removeprefix("m.")] = value
        elif kind == "LOSS_OUTPUT":
            loss = value
        elif kind == "GRADIENT_TO_PARAMETER":
            grads[spec.target.removeprefix("m.")] = value
    return loss, grads


def _optimizer_step(kind, opt: OptimizerConfig, w, g, states, lr):
    """torch.optim's update on flat vectors (module docstring)."""
    import torch

    if kind == "adamw":
        m, v, t = states
        assert opt.betas is not None and opt.eps is not None  # OptimizerConfig gives AdamW both
        b1, b2 = opt.betas
        t1 = t + 1.0
        w = w * (1.0 - lr * opt.weight_decay)
        m1 = m + (g - m) * (1.0 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v1 = v * b2 + g * g * (1.0 - b2)
        # Bias corrections in float64, as torch computes them on the host: 1 - b^t cancels
        # catastrophically in float32 (1 - 0.999f is off by 1.3e-5 relative).
        t64 = t1.to(torch.float64)
        bc1 = 1.0 - torch.pow(torch.tensor(b1, dtype=torch.float64), t64)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(torch.tensor(b2, dtype=torch.float64), t64))
        step_size = (lr.to(torch.float64) / bc1).to(torch.float32)
        denom = torch.sqrt(v1) / bc2_sqrt.to(torch.float32) + opt.eps
        w = w - step_size * (m1 / denom)
        return w, (m1, v1, t1)
    if kind == "sgd_momentum":
        (b,) = states
        b1 = b * opt.momentum + g
        return w - lr * b1, (b1,)
    return w - lr * g, ()


def _eval_module(model, param_order, buffers, loss_fn):
    """The module exported as the eval graph: the model in eval mode on the flat vectors."""
    import torch

    eval_model = copy.deepcopy(model).eval()
    buffer_slots = [(b.name, b.shape, b.offset, b.size) for b in buffers]

    class Eval(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = eval_model

        def forward(self, params, bufs, x, y):
            tensors = dict(zip((s[0] for s in param_order), _views(params, param_order)))
            tensors.update(zip((b.name for b in buffers), _views(bufs, buffer_slots)))
            out = torch.func.functional_call(self.m, tensors, (x,), strict=False)
            return loss_fn(out, y), out

    return Eval()


def _to_onnx(module, args, input_names, output_names, dynamic) -> onnx.ModelProto:
    import onnx
    import torch

    batch = torch.export.Dim("batch", min=1)
    dyn = tuple(
        {0: batch} if i in dynamic else (tuple(None for _ in a) if isinstance(a, tuple) else None) for i, a in enumerate(args)
    )
    ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
    ep = ep.run_decompositions(_decompositions())
    prog = torch.onnx.export(
        ep,
        args,
        dynamo=True,
        optimize=False,
        opset_version=STEP_OPSET,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
    )
    if prog is None or prog.model_proto is None:
        raise ExportError("torch.onnx.export returned no model")
    proto = onnx.load_from_string(prog.model_proto.SerializeToString())
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    _name_batch_dim(proto, input_names)
    # The exporter annotates each node with its torch source (file paths, stack traces): 90% of
    # the file, and it would make the bytes, hence model_hash, depend on where export ran.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    proto.graph.doc_string = ""
    check_standard(proto)
    return proto


def _name_batch_dim(proto, input_names) -> None:
    """torch names the dynamic batch dimension after its symbol (`s17`); call it `batch`."""
    symbols = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim[:1] if d.dim_param}
    for vi in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in symbols:
                d.dim_param = "batch"


def check_standard(proto) -> None:
    """Plain onnxruntime must run it: default ONNX domain only, opset 18, IR <= 10, no local functions."""
    domains = {o.domain for o in proto.opset_import}
    if domains - {"", "ai.onnx"} or proto.functions or any(n.domain not in ("", "ai.onnx") for n in proto.graph.node):
        raise ExportError(
            f"the portable graph uses a non-standard ONNX domain ({sorted(domains)}); plain onnxruntime could not run it"
        )
    if proto.ir_version > MAX_IR_VERSION:
        raise ExportError(f"the portable graph has IR version {proto.ir_version} > {MAX_IR_VERSION}")

"""Ask ONNX Runtime itself how a bundle lays out its parameters, and check the bundle really trains.

The flat float32 vector that travels between devices and aggregator is ORT's
`Module.get_contiguous_parameters(trainable_only=True)`. Its order is ORT's business, so we do not
assume it: we load the generated artifacts with the same training API a device uses and observe it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.export._errtext import one_line
from fleetlearn.export._native_io import quiet_native_output
from fleetlearn.export.errors import ExportError


@dataclass(frozen=True)
class ParamSlot:
    """Where one trainable tensor lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


def _load(bundle_dir: Path):
    from fleetlearn.edge_runtime.engines.ort_api import CheckpointState, Module, Optimizer

    state = CheckpointState.load_checkpoint(bundle_dir / "checkpoint")
    module = Module(bundle_dir / "training_model.onnx", state, bundle_dir / "eval_model.onnx")
    return state, module, Optimizer


def probe_layout(bundle_dir: Path, expected: Mapping[str, np.ndarray]) -> list[ParamSlot]:
    """The trainable parameters in flat-vector order, with offsets.

    `expected` maps each trainable name to its initial value; the checkpoint must hold exactly those.
    Two passes, both through ORT's own copy functions (always with trainable_only=True: in ORT 1.19.2
    `get_contiguous_parameters` defaults to *all* parameters while `copy_buffer_to_parameters`
    defaults to trainable only):

    1. locate: fill parameter k with the value k+1, read the flat vector back, and find each run;
    2. verify: write 0, 1, 2, ... into the flat vector and check every parameter reads back its
       slice in C (row-major) order, i.e. slot i holds element i of `param.ravel()`.
    """
    from fleetlearn.edge_runtime.engines.ort_api import OrtValue

    try:
        with quiet_native_output():
            state, module, _ = _load(bundle_dir)
    except Exception as exc:
        raise ExportError(f"the generated bundle does not load in onnxruntime: {one_line(exc)}") from exc
    trainable = {name for name, p in state.parameters if p.requires_grad}
    if trainable != set(expected):
        raise ExportError(f"the checkpoint's trainable parameters {sorted(trainable)} differ from the model's {sorted(expected)}")
    for name, value in expected.items():
        got = np.array(state.parameters[name].data, copy=True)
        if got.shape != value.shape or not np.array_equal(got, value):
            raise ExportError(f"the checkpoint's initial value of {name!r} differs from the model's")

    total = int(module.get_parameters_size(trainable_only=True))
    names = sorted(expected)  # any fixed order works for tagging
    if len(names) >= 1 << 24:
        raise ExportError("more than 2**24 parameter tensors; cannot tag them in float32")
    for k, name in enumerate(names):
        state.parameters[name].data = np.full(expected[name].shape, k + 1, dtype=np.float32)
    flat = module.get_contiguous_parameters(trainable_only=True).numpy()
    slots: list[ParamSlot] = []
    for k, name in enumerate(names):
        where = np.flatnonzero(flat == k + 1)
        size = int(expected[name].size)
        if where.size != size or (size and where[-1] - where[0] + 1 != size):
            raise ExportError(f"parameter {name!r} is not one contiguous run in ORT's flat buffer")
        slots.append(ParamSlot(name, tuple(expected[name].shape), int(where[0]) if size else -1, size))
    slots.sort(key=lambda s: s.offset)
    offset = 0
    for i, slot in enumerate(slots):
        if slot.size == 0:  # an empty tensor occupies nothing; place it where we are
            slots[i] = ParamSlot(slot.name, slot.shape, offset, 0)
        elif slot.offset != offset:
            raise ExportError(f"ORT's flat buffer has a gap or overlap at parameter {slot.name!r}")
        offset += slot.size
    if offset != total:
        raise ExportError(f"ORT reports {total} trainable values but the parameters hold {offset}")

    # Pass 2. Values stay exact in float32 below 2**24; wrap larger models (offsets are known).
    ramp = (np.arange(total, dtype=np.int64) % (1 << 23)).astype(np.float32)
    module.copy_buffer_to_parameters(OrtValue.ortvalue_from_numpy(ramp)._ortvalue, trainable_only=True)
    for slot in slots:
        got = np.array(state.parameters[slot.name].data, copy=True).ravel()
        if not np.array_equal(got, ramp[slot.offset : slot.offset + slot.size]):
            raise ExportError(f"parameter {slot.name!r} is not laid out row-major in ORT's flat buffer")
    return slots


def smoke_train(
    bundle_dir: Path,
    input_shape: tuple[int, ...],
    label_shape: tuple[int, ...],
    label_dtype: str,
    output_shape: tuple[int, ...],
    lr: float,
    proximal: bool = False,
) -> None:
    """One train step, one optimizer step and one eval step on a dummy batch, as a device would run them.

    Catches bundles that export but fail at run time (a kernel missing, a shape mismatch) here,
    instead of on a thousand devices.
    """
    batch = 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    if label_dtype == "int64":
        y = rng.integers(0, max(output_shape[-1], 1), size=(batch, *label_shape)).astype(np.int64)
    else:
        y = rng.random((batch, *label_shape)).astype(np.float32)
    try:
        with quiet_native_output():  # ORT logs errors to the C++ stderr as well as raising them
            state, module, Optimizer = _load(bundle_dir)
            optimizer = Optimizer(bundle_dir / "optimizer_model.onnx", module)
            optimizer.set_learning_rate(lr)
            module.train()
            extra = []
            if proximal:  # FedProx's inputs (export/ort_proximal.py): w_g = the weights, mu = 0.1
                from fleetlearn.export.ort_proximal import GLOBAL, MU

                for name in module.input_names()[2:]:
                    if name == MU:
                        extra.append(np.asarray(0.1, np.float32))
                    else:
                        extra.append(np.array(state.parameters[name.removeprefix(GLOBAL)].data, np.float32) + np.float32(0.5))
            train_out = module(x, y, *extra)
            optimizer.step()
            module.lazy_reset_grad()
            module.eval()
            eval_out = module(x, y)
    except Exception as exc:
        raise ExportError(f"the generated bundle fails a training step in onnxruntime: {one_line(exc)}") from exc
    if proximal:
        if not isinstance(train_out, tuple) or len(train_out) != 2:
            raise ExportError("the bundle's proximal training step should return (objective, loss)")
        if not train_out[0] > train_out[1]:  # w_g is 0.5 away from w: the term is positive
            raise ExportError("the bundle's proximal term does not add to the training objective")
        train_out = train_out[1]
    elif isinstance(train_out, tuple):
        raise ExportError("the bundle's training step should return the loss alone")
    if not isinstance(eval_out, tuple) or len(eval_out) != 2 or eval_out[1].shape != (batch, *output_shape):
        raise ExportError(f"the bundle's eval step does not return (loss, output of shape (batch, *{output_shape}))")
    for what, loss in (("train", train_out), ("eval", eval_out[0])):
        if not np.isfinite(loss).all():
            raise ExportError(f"the bundle's {what} step gives a non-finite loss on a dummy batch")

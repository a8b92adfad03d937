"""The portable engine: a whole training step as one plain ONNX graph, run by onnxruntime's
InferenceSession. Needs numpy and any onnxruntime >= 1.19 (CPU, aarch64 or x86_64): no training
API, no torch, no onnx package.

The bundle's `step_model.onnx` maps (params, optimizer state, buffers, x, y, lr) to
(loss, params', optimizer state', buffers'); docs/bundle.md has the signature and the math.
State lives in two preallocated sets of numpy arrays, A and B. Each step binds A as inputs and B
as outputs (IOBinding: onnxruntime reads and writes our memory directly, no copies, no
allocation per step), then swaps the roles. Measured on the Boston MLP, this is the fastest of
the variants tried (one input per tensor, or run() with feeds, were 20-60% slower).

Dropout, when the model has it, draws from onnxruntime's own unseeded generator.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest, PortableSpec
from fleetlearn.edge_runtime.core.errors import BundleError
from fleetlearn.edge_runtime.core.onnx_wire import read_onnx_facts
from fleetlearn.edge_runtime.engines.base import Engine

PARAMS, BUFFERS, LR, LOSS = "params", "buffers", "lr", "loss"
GLOBAL_PARAMS, MU = "global_params", "mu"  # FedProx's inputs, in proximal bundles (docs/bundle.md)


def _ort():
    """onnxruntime, imported without torch also where it is the onnxruntime-training build."""
    if "onnxruntime" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.origin and os.path.isdir(os.path.join(os.path.dirname(spec.origin), "training")):
            # onnxruntime-training's `import onnxruntime` probes ortmodule, which imports torch;
            # ort_api registers a stub that prevents it (see its docstring).
            from fleetlearn.edge_runtime.engines import ort_api  # noqa: F401
    import onnxruntime

    return onnxruntime


class PortableEngine(Engine):
    name = "portable"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int = 1):
        spec = manifest.portable
        if spec is None:
            raise BundleError(
                f"bundle {manifest.model_name} has no portable engine (its manifest lists {', '.join(manifest.engines)}); "
                "re-export it with a fleetlearn that writes step_model.onnx"
            )
        ort = _ort()
        ort.set_default_logger_severity(3)
        root = Path(bundle_dir)
        self.manifest, self.spec, self.threads = manifest, spec, threads
        self.default_lr = float(manifest.optimizer.get("lr", 1e-3))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for file in (spec.step_model, spec.eval_model):
            _check_standard(root / file, spec)
        self._step = _session(ort, root / spec.step_model, options, "step graph")
        # A device only trains: the eval graph is loaded and checked here (a broken bundle fails
        # now, not at the first evaluation), then let go, and opened again on first use. Kept
        # open it would cost a device ~0.2 MB more of its peak RSS (docs/benchmarks.md).
        self._eval_session: object | None = None
        self._eval_open = (ort, root / spec.eval_model, options)
        label = manifest.raw.get("label", {}) if isinstance(manifest.raw.get("label"), dict) else {}
        self._label_name = str(label.get("name", "labels" if manifest.label_is_index else "target"))
        self._label_dtype = np.int64 if manifest.label_is_index else np.float32
        self._state_names = [PARAMS, *spec.optimizer_state, BUFFERS]
        label_type = "tensor(int64)" if manifest.label_is_index else "tensor(float)"
        label_shape = tuple(d for d in label.get("shape", []) if d != "batch") if isinstance(label.get("shape"), list) else None
        batch = {
            manifest.input_name: ("tensor(float)", (None, *manifest.input_shape)),
            self._label_name: (label_type, None if label_shape is None else (None, *label_shape)),
        }
        step_inputs = {n: ("tensor(float)", s) for n, s in self._state_shapes().items()}
        if manifest.proximal:
            step_inputs.update({GLOBAL_PARAMS: ("tensor(float)", (manifest.num_params,)), MU: ("tensor(float)", ())})
        _check_signature(
            self._step,
            {**step_inputs, **batch, LR: ("tensor(float)", ())},
            [LOSS, *(f"{n}_out" for n in self._state_names)],
            "step graph",
        )
        self._eval_inputs = {
            PARAMS: ("tensor(float)", (manifest.num_params,)),
            BUFFERS: ("tensor(float)", (spec.num_buffers,)),
            **batch,
        }
        self._open_eval()

        params, buffers = _initial_state(root / spec.initial_state, manifest.num_params, spec.num_buffers)
        self._sets = [self._new_set(), self._new_set()]
        cur = self._sets[0]
        cur[PARAMS][:] = params
        cur[BUFFERS][:] = buffers
        self._cur = 0
        self._lr = np.zeros((), np.float32)
        self._anchor = np.zeros(manifest.num_params if manifest.proximal else 0, np.float32)  # w_g
        self._mu = np.zeros((), np.float32)
        self._loss = np.zeros((), np.float32)
        # One binding per direction (A -> B, B -> A); per step only x and y are rebound.
        self._bindings = [self._bind(self._sets[i], self._sets[1 - i]) for i in (0, 1)]
        self._batch: tuple[np.ndarray, np.ndarray] | None = None  # the bound x, y buffers

    # ---------------------------------------------------------------- state

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The step graph's state inputs (float32): params, optimizer state, buffers."""
        p = self.manifest.num_params
        shapes: dict[str, tuple[int, ...]] = {PARAMS: (p,)}
        for name in self.spec.optimizer_state:
            shapes[name] = () if name == "adam_step" else (p,)
        shapes[BUFFERS] = (self.spec.num_buffers,)
        return shapes

    def _new_set(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, np.float32) for name, shape in self._state_shapes().items()}

    def _bind(self, src: dict[str, np.ndarray], dst: dict[str, np.ndarray]):
        io = self._step.io_binding()
        for name in self._state_names:
            a, b = src[name], dst[name]
            io.bind_input(name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
            io.bind_output(f"{name}_out", "cpu", 0, np.float32, list(b.shape), b.ctypes.data)
        io.bind_input(LR, "cpu", 0, np.float32, [], self._lr.ctypes.data)
        if self.manifest.proximal:
            io.bind_input(GLOBAL_PARAMS, "cpu", 0, np.float32, list(self._anchor.shape), self._anchor.ctypes.data)
            io.bind_input(MU, "cpu", 0, np.float32, [], self._mu.ctypes.data)
        io.bind_output(LOSS, "cpu", 0, np.float32, [], self._loss.ctypes.data)
        return io

    def get_weights(self) -> np.ndarray:
        return self._sets[self._cur][PARAMS].copy()

    def set_weights(self, flat: np.ndarray) -> None:
        if flat.shape != (self.manifest.num_params,):
            raise ValueError(f"weights have shape {flat.shape}, expected ({self.manifest.num_params},)")
        np.copyto(self._sets[self._cur][PARAMS], flat, casting="same_kind")

    # ---------------------------------------------------------------- steps

    def _begin_train(self, lr: float, mu: float) -> None:
        self._lr[...] = lr
        if self.manifest.proximal:  # both bindings read these buffers: fill them in place
            np.copyto(self._anchor, self._sets[self._cur][PARAMS])
            self._mu[...] = mu

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        # The batch goes into buffers bound once per batch shape (both bindings read the same
        # ones), so a step with the usual batch size copies it and binds nothing.
        if self._batch is None or self._batch[0].shape != x.shape or self._batch[1].shape != y.shape:
            self._batch = (np.empty(x.shape, np.float32), np.empty(y.shape, self._label_dtype))
            for io in self._bindings:
                io.bind_cpu_input(self.manifest.input_name, self._batch[0])
                io.bind_cpu_input(self._label_name, self._batch[1])
        np.copyto(self._batch[0], x, casting="same_kind")
        np.copyto(self._batch[1], y, casting="same_kind")
        self._step.run_with_iobinding(self._bindings[self._cur])
        self._cur = 1 - self._cur
        return float(self._loss)

    def _open_eval(self):
        ort, path, options = self._eval_open
        session = _session(ort, path, options, "eval graph")
        _check_signature(session, self._eval_inputs, [LOSS, self.manifest.output_name], "eval graph")
        return session

    @property
    def _eval(self):
        """The eval graph's session, opened on first use (checked already in __init__)."""
        if self._eval_session is None:
            self._eval_session = self._open_eval()
        return self._eval_session

    def _eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        cur = self._sets[self._cur]
        feed = {
            PARAMS: cur[PARAMS], BUFFERS: cur[BUFFERS],
            self.manifest.input_name: np.ascontiguousarray(x, dtype=np.float32),
            self._label_name: np.ascontiguousarray(y, dtype=self._label_dtype),
        }  # fmt: skip
        loss, out = self._eval.run(None, feed)
        return float(loss), out

    def live_state(self) -> dict[str, np.ndarray]:
        """The arrays the next step reads (params, optimizer state, buffers), not copies: a host
        that shares this engine between devices (the swarm) copies each device's state in before
        it trains and out after; the step reads nothing else, so the result is bit for bit a
        lone engine's."""
        return self._sets[self._cur]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of the optimizer state and buffers (for tests and diagnostics)."""
        return {k: v.copy() for k, v in self._sets[self._cur].items() if k != PARAMS}

    def export_inference_model(self, path: str | Path) -> None:
        raise BundleError(
            "the portable engine cannot write an inference model (that needs the onnx package); "
            "use the onnxruntime-training engine, or run portable_eval_model.onnx with the weights"
        )


def _check_standard(path: Path, spec: PortableSpec) -> None:
    """Standard ONNX only: any onnxruntime build must run it (no contrib or custom-op domains)."""
    facts = read_onnx_facts(path)
    odd = sorted(d for d in facts.opsets if d not in ("", "ai.onnx"))
    if odd:
        raise BundleError(f"{path.name}: uses operator domain(s) {', '.join(odd)}; the portable engine runs standard ONNX only")
    if facts.functions:
        raise BundleError(f"{path.name}: defines {facts.functions} local function(s); the portable engine runs plain graphs only")
    if facts.ir_version > 10 or facts.ir_version < 8:
        raise BundleError(f"{path.name}: ONNX IR version {facts.ir_version} (the portable engine reads 8-10)")


def _session(ort, path: Path, options, what: str):
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path.name}: onnxruntime cannot load the portable {what}: {first}") from None


def _check_signature(session, inputs: dict[str, tuple[str, tuple | None]], outputs: list[str], what: str) -> None:
    """The graph's inputs/outputs must be exactly the manifest's, by name, dtype and shape.

    In an expected shape None stands for the batch dimension, which must be dynamic (a name or
    unknown) in the graph: a graph fixed to one batch size would fail on the last, smaller batch.
    """
    got = {i.name: i for i in session.get_inputs()}
    if set(got) != set(inputs):
        raise BundleError(f"portable {what}: inputs {sorted(got)} are not the expected {sorted(inputs)}")
    for name, (dtype, shape) in inputs.items():
        meta = got[name]
        have = [d if isinstance(d, int) else None for d in meta.shape]
        if meta.type != dtype or (shape is not None and have != list(shape)):
            want = "?" if shape is None else [("batch" if d is None else d) for d in shape]
            raise BundleError(
                f"portable {what}: input {name!r} is {meta.type}{list(meta.shape)}, the manifest implies {dtype}{want}"
            )
    names = [o.name for o in session.get_outputs()]
    if names != outputs:
        raise BundleError(f"portable {what}: outputs {names} are not the expected {outputs}")


def _initial_state(path: Path, num_params: int, num_buffers: int) -> tuple[np.ndarray, np.ndarray]:
    expected = 4 * (num_params + num_buffers)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"{path.name}: cannot read the initial state ({exc.strerror})") from None
    if size != expected:  # checked before reading: the manifest bounds what we allocate
        raise BundleError(f"{path.name}: {size} bytes, expected {expected} (float32 params + buffers)")
    state = np.fromfile(path, dtype="<f4").astype(np.float32, copy=False)
    if not np.isfinite(state).all():
        raise BundleError(f"{path.name}: the initial state holds NaN or Inf")
    return state[:num_params], state[num_params:]

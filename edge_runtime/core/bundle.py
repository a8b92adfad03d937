"""Reading and verifying an export bundle (the directory `fleetlearn export` writes).

A bundle holds `training_model.onnx`, `eval_model.onnx`, `optimizer_model.onnx`, `checkpoint`
(the onnxruntime-training engine), `step_model.onnx`, `portable_eval_model.onnx`,
`initial_state.f32` (the portable engine, when the manifest lists it), `model.onnx` (forward only)
and `manifest.json`. The manifest is the contract between export,
devices and aggregator; docs/bundle.md describes every field. This module only reads it, so
it depends on the standard library and numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import BundleError

FORMAT = "fleetlearn-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ORT_TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
REQUIRED_FILES = (*ORT_TRAINING_FILES, "model.onnx")  # a bundle listing the ort-training engine
ENGINES = ("ort-training", "portable")  # the engines this reader knows; a manifest may list others
# The portable step graph's optimizer state inputs, per optimizer (docs/bundle.md, "The portable engine").
PORTABLE_STATE = {"adamw": ("adam_m", "adam_v", "adam_step"), "sgd_momentum": ("sgd_momentum",), "sgd": ()}
MAX_PORTABLE_VALUES = 1 << 28  # params + buffers; bounds what a device allocates from a manifest
TASKS = ("regression", "classification", "binary")
LOSSES = ("mse", "cross_entropy", "bce_with_logits")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ParamSpec:
    """One trainable tensor's place in the flat parameter vector that travels on the wire."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class PortableSpec:
    """The portable engine's files and graph signature (manifest field `portable`)."""

    step_model: str
    eval_model: str
    initial_state: str  # raw little-endian float32: num_params parameters, then num_buffers buffers
    optimizer_state: tuple[str, ...]  # step graph inputs after `params`, in order
    buffers: tuple[ParamSpec, ...]  # float32 buffers training updates (BatchNorm running statistics)
    num_buffers: int
    opset: int
    ir_version: int
    dropout: bool


@dataclass(frozen=True)
class Preprocessing:
    """Feature standardisation fixed at export time: x' = (x - mean) / std. Never fitted on a device."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def apply(self, x):
        """Standardise a batch x of shape (n, *input_shape); mean/std hold one value per input element."""
        import numpy as np

        x = np.asarray(x, dtype=np.float32)
        if self.mean is None or self.std is None:
            return x
        sample_shape = (1,) + x.shape[1:]
        mean = np.asarray(self.mean, dtype=np.float32).reshape(sample_shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(sample_shape)
        return (x - mean) / std


@dataclass(frozen=True)
class Manifest:
    model_name: str
    model_hash: str
    task: str
    loss: str
    input_name: str
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    output_name: str
    output_shape: tuple[int, ...]  # per sample
    num_params: int
    params: tuple[ParamSpec, ...]
    optimizer: dict[str, Any]
    preprocessing: Preprocessing
    files: dict[str, dict[str, Any]]
    engines: tuple[str, ...] = ("ort-training",)
    portable: PortableSpec | None = None
    proximal: bool = False  # FedProx's term is in the training graphs (docs/bundle.md, "The proximal term")
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.output_shape[-1]) if self.output_shape else 1

    @property
    def label_is_index(self) -> bool:
        """cross_entropy takes class indices (int64, shape (n,)); the other losses take float targets."""
        return self.loss == "cross_entropy"


def _need(d: dict, key: str, kind: type | tuple[type, ...], where: str = "manifest"):
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    """A per-sample shape: a list of positive ints (a leading 'batch' symbol is dropped)."""
    if not isinstance(value, list):
        raise BundleError(f"{where}: shape must be a list")
    dims = [d for d in value if d != "batch"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise BundleError(f"{where}: shape {value!r} must hold positive integers")
    return tuple(dims)


def parse_manifest(doc: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (already JSON-decoded) and return it typed."""
    if not isinstance(doc, dict):
        raise BundleError("manifest: not a JSON object")
    if doc.get("format") != FORMAT:
        raise BundleError(f"manifest: format is {doc.get('format')!r}, expected {FORMAT!r}")
    version = _need(doc, "format_version", int)
    if version != FORMAT_VERSION:
        raise BundleError(f"manifest: format_version {version} is not {FORMAT_VERSION}; update fleetlearn")
    model_hash = _need(doc, "model_hash", str)
    if len(model_hash) != 64 or any(c not in "0123456789abcdef" for c in model_hash):
        raise BundleError("manifest: model_hash must be 64 lowercase hex digits (sha256)")
    task = _need(doc, "task", str)
    if task not in TASKS:
        raise BundleError(f"manifest: task {task!r} not one of {TASKS}")
    loss = _need(doc, "loss", str)
    if loss not in LOSSES:
        raise BundleError(f"manifest: loss {loss!r} not one of {LOSSES}")
    inputs = _need(doc, "inputs", list)
    outputs = _need(doc, "outputs", list)
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError("manifest: exactly one model input and one output are supported")
    params_doc = _need(doc, "params", list)
    params: list[ParamSpec] = []
    offset = 0
    for i, p in enumerate(params_doc):
        where = f"manifest.params[{i}]"
        if not isinstance(p, dict):
            raise BundleError(f"{where}: not an object")
        shape = tuple(_need(p, "shape", list, where))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise BundleError(f"{where}: bad shape {list(shape)!r}")
        size = math.prod(shape)
        if _need(p, "offset", int, where) != offset or _need(p, "size", int, where) != size:
            raise BundleError(f"{where}: offset/size do not tile the flat vector")
        params.append(ParamSpec(_need(p, "name", str, where), shape, offset, size))
        offset += size
    num_params = _need(doc, "num_params", int)
    if num_params != offset or num_params <= 0:
        raise BundleError(f"manifest: num_params {num_params} != sum of parameter sizes {offset}")
    pre = doc.get("preprocessing") or {}
    if not isinstance(pre, dict):
        raise BundleError("manifest: preprocessing must be an object")
    mean, std = pre.get("mean"), pre.get("std")
    if (mean is None) != (std is None):
        raise BundleError("manifest: preprocessing needs both mean and std, or neither")
    if mean is not None:
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
            raise BundleError("manifest: preprocessing mean/std must be lists of equal length")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
            raise BundleError("manifest: preprocessing mean/std must be finite, std > 0")
    files = _need(doc, "files", dict)
    engines = _engines(doc)
    for name in (*(ORT_TRAINING_FILES if "ort-training" in engines else ()), "model.onnx"):
        _need_file(files, name)
    for name in files:
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
            raise BundleError(f"manifest: unsafe file name {name!r}")
    optimizer = _need(doc, "optimizer", dict)
    portable = _portable(doc, files, optimizer, num_params) if "portable" in engines else None
    proximal = doc.get("proximal", False)  # absent in bundles older than FedProx: no term
    if not isinstance(proximal, bool):
        raise BundleError("manifest: proximal must be true or false")
    return Manifest(
        model_name=_need(doc, "model_name", str),
        model_hash=model_hash,
        task=task,
        loss=loss,
        input_name=_need(inputs[0], "name", str, "manifest.inputs[0]"),
        input_shape=_shape(_need(inputs[0], "shape", list, "manifest.inputs[0]"), "manifest.inputs[0]"),
        output_name=_need(outputs[0], "name", str, "manifest.outputs[0]"),
        output_shape=_shape(_need(outputs[0], "shape", list, "manifest.outputs[0]"), "manifest.outputs[0]"),
        num_params=num_params,
        params=tuple(params),
        optimizer=optimizer,
        preprocessing=Preprocessing(tuple(mean) if mean else None, tuple(std) if std else None),
        files=files,
        engines=engines,
        portable=portable,
        proximal=proximal,
        raw=doc,
    )


def _need_file(files: dict, name: str) -> None:
    entry = files.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise BundleError(f"manifest: files[{name!r}] needs a sha256")


def _engines(doc: dict[str, Any]) -> tuple[str, ...]:
    """`engines`: which trainers the bundle carries. Absent in bundles older than the portable engine."""
    if "engines" not in doc:
        return ("ort-training",)
    engines = doc["engines"]
    if not isinstance(engines, list) or not engines or len(engines) > 16:
        raise BundleError("manifest: engines must be a non-empty list of engine names")
    if not all(isinstance(e, str) and 0 < len(e) <= 64 for e in engines) or len(set(engines)) != len(engines):
        raise BundleError(f"manifest: engines {engines!r} must be distinct names")
    if not set(engines) & set(ENGINES):
        raise BundleError(f"manifest: engines {engines!r} lists none this device knows ({', '.join(ENGINES)}); update fleetlearn")
    return tuple(engines)


def _portable(doc: dict[str, Any], files: dict, optimizer: dict, num_params: int) -> PortableSpec:
    where = "manifest.portable"
    sec = _need(doc, "portable", dict)
    names = {key: _need(sec, key, str, where) for key in ("step_model", "eval_model", "initial_state")}
    for key, name in names.items():
        if name not in files:
            raise BundleError(f"{where}: {key} {name!r} is not among the bundle's files")
        _need_file(files, name)
    onnx_doc = _need(sec, "onnx", dict, where)
    opset, ir = _need(onnx_doc, "opset", int, where + ".onnx"), _need(onnx_doc, "ir_version", int, where + ".onnx")
    if opset < 18 or ir > 10 or ir < 8:
        raise BundleError(f"{where}: opset {opset} / IR version {ir} unsupported (needs opset >= 18, IR 8-10)")
    opt_name = optimizer.get("name")
    momentum = optimizer.get("momentum")
    has_momentum = isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum > 0
    kind = "adamw" if opt_name == "adamw" else ("sgd_momentum" if has_momentum else "sgd")
    state = _need(sec, "optimizer_state", list, where)
    if opt_name not in ("adamw", "sgd") or tuple(state) != PORTABLE_STATE[kind]:
        raise BundleError(
            f"{where}: optimizer_state {state!r} does not match optimizer {opt_name!r} (expected {list(PORTABLE_STATE[kind])})"
        )
    buffers: list[ParamSpec] = []
    offset = 0
    for i, b in enumerate(_need(sec, "buffers", list, where)):
        bw = f"{where}.buffers[{i}]"
        if not isinstance(b, dict):
            raise BundleError(f"{bw}: not an object")
        shape = tuple(_need(b, "shape", list, bw))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or len(shape) > 8:
            raise BundleError(f"{bw}: bad shape {list(shape)!r}")
        size = math.prod(shape)
        if _need(b, "offset", int, bw) != offset or _need(b, "size", int, bw) != size:
            raise BundleError(f"{bw}: offset/size do not tile the flat buffer vector")
        buffers.append(ParamSpec(_need(b, "name", str, bw), shape, offset, size))
        offset += size
    num_buffers = _need(sec, "num_buffers", int, where)
    if num_buffers != offset:
        raise BundleError(f"{where}: num_buffers {num_buffers} != sum of buffer sizes {offset}")
    if num_params + num_buffers > MAX_PORTABLE_VALUES:
        raise BundleError(f"{where}: {num_params + num_buffers} state values exceed the limit {MAX_PORTABLE_VALUES}")
    size = files[names["initial_state"]].get("size")
    if size is not None and size != 4 * (num_params + num_buffers):
        raise BundleError(
            f"{where}: initial_state has {size} bytes, expected {4 * (num_params + num_buffers)} (float32 params + buffers)"
        )
    return PortableSpec(
        step_model=names["step_model"], eval_model=names["eval_model"], initial_state=names["initial_state"],
        optimizer_state=tuple(state), buffers=tuple(buffers), num_buffers=num_buffers, opset=opset, ir_version=ir,
        dropout=bool(_need(sec, "dropout", bool, where)),
    )  # fmt: skip


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no {MANIFEST} (not an export bundle, or empty)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    return parse_manifest(doc)


def verify_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its sha256 (and size, when recorded)."""
    root = Path(bundle_dir)
    for name, entry in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{root}: bundle file {name} is missing")
        if "size" in entry and path.stat().st_size != entry["size"]:
            raise BundleError(f"{root}: bundle file {name} has size {path.stat().st_size}, manifest says {entry['size']}")
        if file_sha256(path) != entry["sha256"]:
            raise BundleError(f"{root}: bundle file {name} fails its sha256 check (corrupt or altered)")


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Load and (by default) fully verify a bundle directory. Raises BundleError with the reason."""
    manifest = load_manifest(bundle_dir)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def check_chunk_size(size: int) -> int:
    """The bundle chunk size, within the protocol's bounds; UsageError otherwise."""
    from fleetlearn.edge_runtime.core.errors import UsageError
    from fleetlearn.edge_runtime.core.protocol import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

    if isinstance(size, bool) or not isinstance(size, int) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size {size} must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    return size


def plan_announcement(bundle_dir: str | Path, manifest: Manifest, chunk_size: int):
    """The BundleAnnouncement of a verified bundle cut into `chunk_size` chunks (the aggregator
    publishes it; broker-config sizes the broker's limits from it). Every file's size must be in
    the manifest (devices check sizes before they assemble) and match the file on disk."""
    from fleetlearn.edge_runtime.core.protocol import BundleAnnouncement

    root = Path(bundle_dir)
    check_chunk_size(chunk_size)
    order = tuple(manifest.files)
    total = 0
    for name in order:
        size = (root / name).stat().st_size
        recorded = manifest.files[name].get("size")
        if recorded is None:
            raise BundleError(f"{root}: manifest has no size for {name}; devices need it to fetch the bundle (re-export it)")
        if recorded != size:
            raise BundleError(f"{root}: {name} is {size} bytes, the manifest says {recorded}")
        total += size
    if total == 0:
        raise BundleError(f"{root}: bundle files are empty")
    return BundleAnnouncement(manifest.model_hash, dict(manifest.raw), order, total, chunk_size, -(-total // chunk_size))

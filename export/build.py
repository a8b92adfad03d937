"""`build_bundle`: PyTorch module in, verified on-device training bundle out."""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetlearn.edge_runtime.core.bundle import Manifest, load_bundle
from fleetlearn.export.errors import UsageError
from fleetlearn.export.losses import label_shape, loss_spec, task_for
from fleetlearn.export.optimizers import OptimizerConfig
from fleetlearn.export.preprocessing import validate_preprocessing
from fleetlearn.export.publish import check_target, staged_directory

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BundleRequest:
    """Validated arguments of one export (everything except the module itself)."""

    out_dir: Path
    model_name: str
    input_shape: tuple[int, ...]
    loss: str
    task: str
    optimizer: OptimizerConfig
    preprocessing: dict[str, list[float]]
    force: bool
    seed: int | None
    portable: bool = True  # also write the portable engine's plain-ONNX step/eval graphs
    proximal: bool = True  # FedProx's mu/2 ||w - w_g||^2 in the training graphs (mu = 0 by default)


def make_request(
    out_dir: str | Path,
    *,
    model_name: str,
    input_shape: Iterable[int],
    loss: str,
    optimizer: str | OptimizerConfig = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: Iterable[float] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    task: str | None = None,
    force: bool = False,
    seed: int | None = None,
    portable: bool = True,
    proximal: bool = True,
) -> BundleRequest:
    """Validate build_bundle's arguments without touching torch. Raises UsageError (one line)."""
    if not isinstance(model_name, str) or not _NAME.match(model_name):
        raise UsageError(f"model name {model_name!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
    shape = parse_shape(input_shape)
    spec = loss_spec(loss)
    if isinstance(optimizer, OptimizerConfig):
        if any(v is not None for v in (lr, weight_decay, betas, eps, momentum)):
            raise UsageError("pass hyper-parameters either in the OptimizerConfig or as arguments, not both")
        opt = optimizer
    else:
        opt = OptimizerConfig.create(optimizer, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum)
    out = Path(out_dir)
    check_target(out, force)
    return BundleRequest(
        out_dir=out,
        model_name=model_name,
        input_shape=shape,
        loss=spec.name,
        task=task_for(spec, task),
        optimizer=opt,
        preprocessing=validate_preprocessing(preprocessing, shape),
        force=force,
        seed=seed,
        portable=bool(portable),
        proximal=bool(proximal),
    )


def parse_shape(value: str | Iterable[int]) -> tuple[int, ...]:
    """`13`, `1,8,8`, (1, 8, 8) -> a tuple of positive ints (per sample, no batch dimension)."""
    try:
        if isinstance(value, str):
            parts = value.strip().split(",")
            dims = tuple(int(v) for v in parts) if value.strip() else ()
        elif isinstance(value, int):
            dims = (value,)
        else:
            dims = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"input shape {value!r} must be positive integers like 13 or 1,8,8") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"input shape {value!r} must be positive integers like 13 or 1,8,8")
    if math.prod(dims) > 1 << 28:
        raise UsageError(f"input shape {dims} is implausibly large")
    return dims


def build_bundle(
    model: nn.Module,
    out_dir: str | Path,
    *,
    model_name: str,
    input_shape: Iterable[int],
    loss: str,
    optimizer: str | OptimizerConfig = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: Iterable[float] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    task: str | None = None,
    force: bool = False,
    seed: int | None = None,
    portable: bool = True,
    proximal: bool = True,
) -> Manifest:
    """Export `model` to an on-device training bundle in `out_dir`; return its verified manifest.

    Hyper-parameters left as None take torch's defaults for the optimizer (adamw: lr 1e-3,
    weight_decay 1e-2, betas (0.9, 0.999), eps 1e-8; sgd: lr 1e-3, momentum 0, weight_decay 0).
    `preprocessing` is {"mean": [...], "std": [...]} with one value per input element, or None.
    `task` is implied by the loss and may be omitted. `seed` is recorded in the manifest as the seed
    that produced the model's initial weights: pass the one you gave `resolve_model(..., seed=...)`
    (None records null). The export itself is deterministic: the same weights give byte-identical
    files. `model` and the caller's torch RNG state are not modified. `portable` (default) also
    writes the plain-ONNX step and eval graphs of the portable engine (docs/bundle.md); without it
    the bundle trains with onnxruntime-training only. `proximal` (default) puts FedProx's term
    mu/2 ||w - w_g||^2 into both engines' training graphs, with w_g and mu as graph inputs (mu
    comes with each round; mu = 0 trains exactly as without the term); without it the manifest
    says `"proximal": false` and devices sit out rounds that ask for mu > 0.

    The bundle is built beside `out_dir` and renamed into place only when complete and verified,
    so a failure leaves nothing behind. An existing `out_dir` is refused unless `force`, and even
    then only if it is a bundle. Not thread-safe: ORT's onnxblock builds graphs in module globals.

    Raises UsageError (bad arguments), ExportError (the model cannot be exported or trained
    through; a subclass of UsageError) or BundleError. Each carries a one-line reason.
    """
    request = make_request(
        out_dir, model_name=model_name, input_shape=input_shape, loss=loss, optimizer=optimizer, lr=lr,
        weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, preprocessing=preprocessing,
        task=task, force=force, seed=seed, portable=portable, proximal=proximal,
    )  # fmt: skip
    return build_from_request(model, request)


def build_from_request(model: nn.Module, request: BundleRequest) -> Manifest:
    import onnx
    import torch

    import fleetlearn.edge_runtime.engines.ort_api as ort_api
    from fleetlearn import __version__ as fleetlearn_version
    from fleetlearn.export.manifest import ManifestFacts, build_manifest, write_manifest
    from fleetlearn.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_model
    from fleetlearn.export.ort_artifacts import ARTIFACT_FILES, generate
    from fleetlearn.export.ort_probe import probe_layout, smoke_train

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"build_bundle needs a torch.nn.Module, got {type(model).__name__}")
    ort_api.set_log_severity(3)
    spec = loss_spec(request.loss)
    kernel = request.optimizer.kernel()
    # The training-mode trace runs dropout, which draws from torch's global RNG. The masks do not
    # reach the graph, but the caller's RNG stream should not move: fork_rng restores it.
    with torch.random.fork_rng(devices=[]):
        exported = export_model(model, request.input_shape)
    labels = label_shape(spec, exported.output_shape)  # refuses a loss that does not fit the output

    with staged_directory(request.out_dir, request.force) as stage:
        generate(exported, spec.name, kernel, stage, proximal=request.proximal)
        onnx.save(exported.inference_graph, stage / MODEL_FILE)
        slots = probe_layout(stage, exported.trainable)
        smoke_train(
            stage, exported.input_shape, labels, spec.label_dtype, exported.output_shape, request.optimizer.lr, request.proximal
        )
        files = [*ARTIFACT_FILES, MODEL_FILE]
        portable = None
        if request.portable:
            from fleetlearn.export.portable_files import write_portable

            with torch.random.fork_rng(devices=[]):
                portable = write_portable(model, stage, slots, exported, spec, labels, request.optimizer, request.proximal)
            files += portable.pop("_files")
        facts = ManifestFacts(
            model_name=request.model_name,
            task=request.task,
            loss=spec.name,
            input_name=INPUT_NAME,
            input_shape=exported.input_shape,
            output_name=OUTPUT_NAME,
            output_shape=exported.output_shape,
            label_name=spec.label_name,
            label_dtype=spec.label_dtype,
            label_shape=labels,
            params=slots,
            frozen=exported.frozen,
            optimizer=request.optimizer.to_manifest(),
            preprocessing=request.preprocessing,
            ir_version=exported.ir_version,
            opset=exported.opset,
            seed=request.seed,
            portable=portable,
            proximal=request.proximal,
            versions={
                "onnxruntime": ort_api.ORT_VERSION,
                "torch": torch.__version__.split("+")[0],
                "onnx": onnx.__version__,
                "fleetlearn": fleetlearn_version,
            },
        )
        created_at = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        doc = build_manifest(facts, stage, files, created_at)
        write_manifest(stage, doc)
        load_bundle(stage)  # the reader devices use must accept what we wrote
    return load_bundle(request.out_dir)

"""Write `manifest.json`: the contract between export, devices and aggregator (docs/bundle.md).

The reader is `fleetlearn.edge_runtime.core.bundle`; this module only assembles the document and its hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.bundle import FORMAT, FORMAT_VERSION, MANIFEST, file_sha256
from fleetlearn.export.ort_probe import ParamSlot

# Fields left out of model_hash: the hash itself, the per-file hashes (covered separately, by
# name and sha256) and the wall-clock time (so re-exporting the same model gives the same hash).
HASH_EXCLUDED = ("model_hash", "files", "created_at")


@dataclass(frozen=True)
class ManifestFacts:
    """Everything the manifest records that is not derived from the files on disk."""

    model_name: str
    task: str
    loss: str
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    label_name: str
    label_dtype: str
    label_shape: tuple[int, ...]
    params: Sequence[ParamSlot]
    frozen: Sequence[str]
    optimizer: dict[str, Any]
    preprocessing: dict[str, list[float]]
    ir_version: int
    opset: int
    seed: int | None
    portable: dict[str, Any] | None = None  # the portable engine's section, or None (ORT training only)
    proximal: bool = False  # FedProx's term is in the training graphs (inputs w_g and mu)
    versions: dict[str, str] = field(default_factory=dict)  # onnxruntime, torch, onnx, fleetlearn


def compute_model_hash(doc: dict[str, Any]) -> str:
    """sha256 identifying a model version (also in docs/bundle.md, "model_hash").

    sha256 over, in order: one line `NAME\\tSHA256\\n` per entry of `files`, sorted by NAME; then
    the canonical JSON (sort_keys, separators "," and ":", ASCII only) of every manifest field
    except model_hash, files and created_at.
    """
    h = hashlib.sha256()
    for name in sorted(doc["files"]):
        h.update(f"{name}\t{doc['files'][name]['sha256']}\n".encode())
    rest = {k: v for k, v in doc.items() if k not in HASH_EXCLUDED}
    h.update(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii"))
    return h.hexdigest()


def build_manifest(facts: ManifestFacts, bundle_dir: Path, file_names: Sequence[str], created_at: str) -> dict[str, Any]:
    batch = ["batch"]
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": facts.model_name,
        "model_hash": "",  # filled below
        "task": facts.task,
        "loss": facts.loss,
        "inputs": [{"name": facts.input_name, "shape": batch + list(facts.input_shape), "dtype": "float32"}],
        "outputs": [{"name": facts.output_name, "shape": batch + list(facts.output_shape), "dtype": "float32"}],
        "label": {"name": facts.label_name, "dtype": facts.label_dtype, "shape": batch + list(facts.label_shape)},
        "params": [{"name": p.name, "shape": list(p.shape), "offset": p.offset, "size": p.size} for p in facts.params],
        "num_params": sum(p.size for p in facts.params),
        "frozen": list(facts.frozen),
        "optimizer": facts.optimizer,
        "preprocessing": facts.preprocessing,
        "onnx": {"ir_version": facts.ir_version, "opset": facts.opset},
        "onnxruntime_version": facts.versions.get("onnxruntime", ""),
        "torch_version": facts.versions.get("torch", ""),
        "onnx_version": facts.versions.get("onnx", ""),
        "exporter": {"fleetlearn_version": facts.versions.get("fleetlearn", "")},
        "seed": facts.seed,
        "engines": ["ort-training", "portable"] if facts.portable else ["ort-training"],
        **({"portable": facts.portable} if facts.portable else {}),
        "proximal": bool(facts.proximal),
        "created_at": created_at,
        "files": {
            name: {"sha256": file_sha256(bundle_dir / name), "size": (bundle_dir / name).stat().st_size}
            for name in sorted(file_names)
        },
    }
    doc["model_hash"] = compute_model_hash(doc)
    return doc


def write_manifest(bundle_dir: Path, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
    (bundle_dir / MANIFEST).write_text(text, encoding="utf-8")

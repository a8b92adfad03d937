"""Feature standardisation fixed at export time: mean/std per input element, from training data.

Devices apply it with `fleetlearn.edge_runtime.core.bundle.Preprocessing.apply` (x' = (x - mean) / std); it is not
baked into the ONNX graphs, so the aggregator and devices can read and audit it in the manifest.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.export.errors import DataError, UsageError


def validate_preprocessing(pre: Mapping[str, Any] | None, input_shape: tuple[int, ...]) -> dict[str, list[float]]:
    """Check a {"mean": [...], "std": [...]} dict against the input shape; {} means "none"."""
    if not pre:
        return {}
    if set(pre) != {"mean", "std"}:
        raise UsageError(f"preprocessing must have exactly the keys mean and std, got {sorted(pre)}")
    n = math.prod(input_shape)
    out: dict[str, list[float]] = {}
    for key in ("mean", "std"):
        values = np.asarray(pre[key], dtype=np.float64).ravel()
        if values.size != n:
            raise UsageError(f"preprocessing {key} has {values.size} values, the input has {n} elements per sample")
        if not np.isfinite(values).all():
            raise UsageError(f"preprocessing {key} holds NaN or Inf")
        out[key] = [float(v) for v in values]
    if any(v <= 0 for v in out["std"]):
        raise UsageError("preprocessing std must be > 0 everywhere")
    return out


def standardization_from_file(path: str | Path, input_shape: tuple[int, ...]) -> dict[str, list[float]]:
    """mean/std of the x of a training data file, one value per input element.

    NPZ: arrays `x` (and `y`) or `x_train` (and `y_train`); `x_train` wins when both exist, because
    statistics must come from training data only. CSV: a header line, numbers, the last column is
    the target. Constant features get std 1 (as scikit-learn's StandardScaler does), so they pass
    through centred instead of dividing by zero.
    """
    x = _load_x(Path(path))
    n = math.prod(input_shape)
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"{path}: no samples")
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != n:
        raise DataError(f"{path}: x has {x.shape[1]} features per sample, the model's input {input_shape} has {n}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x holds NaN or Inf")
    return standardization(x)


def standardization(x: np.ndarray) -> dict[str, list[float]]:
    """mean/std per input element of training samples x (n, ...), finite; constant features
    get std 1 (see standardization_from_file)."""
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    mean = x.mean(axis=0)
    std = x.std(axis=0)  # population std (ddof=0), like StandardScaler
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _load_x(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                for key in ("x_train", "x"):
                    if key in data.files:
                        return np.asarray(data[key], dtype=np.float64)
                raise DataError(f"{path}: no array 'x_train' or 'x' (found: {', '.join(data.files) or 'none'})")
        except DataError:
            raise
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None
        rows = [r for r in rows if any(c.strip() for c in r)]
        if len(rows) < 2:
            raise DataError(f"{path}: needs a header line and at least one data row")
        width = len(rows[0])
        if width < 2:
            raise DataError(f"{path}: needs at least one feature column and the target column")
        for lineno, r in enumerate(rows[1:], start=2):
            if len(r) != width:
                raise DataError(f"{path}: row {lineno} has {len(r)} columns, the header has {width}")
        try:
            table = np.array([[float(c) for c in r] for r in rows[1:]], dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{path}: non-numeric value after the header ({exc})") from None
        return table[:, :-1]
    raise UsageError(f"{path}: --standardize-from reads .npz or .csv files, not {suffix or 'files without a suffix'}")

"""Local data on a device: NPZ (arrays x and y) or CSV with a header.

The data never leaves the device. Preprocessing (standardisation) comes from the bundle's
manifest, fixed at export time, never from local statistics: a device that standardised with
its own mean would train a different model from its neighbours.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlearn.edge_runtime.core.bundle import Manifest
from fleetlearn.edge_runtime.core.errors import DataError

MAX_ROWS = 50_000_000


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 (n, *input_shape), already preprocessed
    y: np.ndarray  # float32 (n, *output_shape) or int64 (n,) class indices

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:  # never unpickle
            keys = set(npz.files)
            for xk, yk in (("x", "y"), ("x_train", "y_train")):
                if xk in keys and yk in keys:
                    return np.asarray(npz[xk]), np.asarray(npz[yk])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable NPZ ({str(exc)[:100]})") from None
    raise DataError(f"{path}: NPZ needs arrays 'x' and 'y' (found {sorted(keys)})")


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({str(exc)[:100]})") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: CSV has no data rows (needs a header line and at least one row)")
    header = [h.strip() for h in rows[0]]
    if target is None:
        t = len(header) - 1
    elif target in header:
        t = header.index(target)
    else:
        raise DataError(f"{path}: target column {target!r} not in header {header}")
    values = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {lineno} has {len(row)} fields, the header has {len(header)} (ragged)")
        try:
            values.append([float(c) for c in row])
        except ValueError:
            raise DataError(f"{path}: line {lineno} holds a non-numeric value") from None
    arr = np.asarray(values, dtype=np.float64)
    return np.delete(arr, t, axis=1), arr[:, t]


def load_dataset(path: str | Path, manifest: Manifest, target: str | None = None) -> Dataset:
    """Load, check and preprocess local data for the bundle's model. Raises DataError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: data file is empty")
    x, y = _read_npz(path) if path.suffix == ".npz" else _read_csv(path, target)
    if x.dtype == object or y.dtype == object:
        raise DataError(f"{path}: arrays must be numeric")
    n = x.shape[0] if x.ndim else 0
    if n == 0:
        raise DataError(f"{path}: no samples")
    if n > MAX_ROWS or y.shape[0] != n:
        raise DataError(f"{path}: x has {n} rows but y has {y.shape[0] if y.ndim else 0}")
    per_sample = math.prod(manifest.input_shape)
    if math.prod(x.shape[1:]) != per_sample:
        raise DataError(f"{path}: samples have shape {x.shape[1:]}, the model takes {manifest.input_shape}")
    x = x.reshape((n,) + manifest.input_shape).astype(np.float32)
    if not np.isfinite(x).all() or not np.isfinite(np.asarray(y, dtype=np.float64)).all():
        raise DataError(f"{path}: data holds NaN or Inf values")
    if manifest.label_is_index:
        y = y.reshape(n)
        if not np.array_equal(y, np.round(y)) or y.min() < 0 or y.max() >= manifest.num_classes:
            raise DataError(f"{path}: labels must be class indices in [0, {manifest.num_classes})")
        y = y.astype(np.int64)
    else:
        if math.prod(y.shape[1:]) != math.prod(manifest.output_shape):
            raise DataError(f"{path}: targets have shape {y.shape[1:]}, the model outputs {manifest.output_shape}")
        y = y.reshape((n,) + manifest.output_shape).astype(np.float32)
    return Dataset(manifest.preprocessing.apply(x), y)

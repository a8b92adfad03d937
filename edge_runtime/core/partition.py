"""Split one data set across N devices the way real fleets are skewed: seeded, deterministic.

Used by `fleetlearn demo --partition`, `fleetlearn experiment` and (device side) a swarm that
cuts its own shard, so it is numpy only. Every scheme is a pure function of (data, N, seed)
returning one int64 index array per device; together they hold every sample exactly once.

Schemes (spec strings, `parse_partition`):
  iid          a seeded permutation cut into N near-equal parts (sizes differ by at most 1).
  dirichlet:α  label skew (Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data
               Distribution for Federated Visual Classification", arXiv:1909.06335): device
               label mixes are drawn from a symmetric Dirichlet with concentration α; small α
               (0.1) gives devices dominated by one or two labels, large α (100) is near IID.
  shards:k     pathological label skew (McMahan et al. 2017, "Communication-Efficient Learning
               of Deep Networks from Decentralized Data", AISTATS): sort by label, cut into N*k
               equal shards, give each device k shards at random (k=2: about two labels each).
  quantity:α   size skew (Li, Diao, Chen & He 2022, "Federated Learning on Non-IID Data Silos:
               An Experimental Study", ICDE, "quantity skew"): device shares q ~ Dir_N(α), the
               contents IID; small α gives a few large devices and many small ones.

Regression targets: the label-based schemes need classes, so `labels_for(y, task)` bins a
continuous target into `DEFAULT_BINS` quantile classes (equal-count bins of the training
targets; ties at a cut go to the lower bin). shards:k sorts by the class, then by the raw
target within it, so for a regression target a shard is a contiguous band of target values.

Every device gets at least one sample: `iid` and `shards` do by construction (N <= n, N*k <= n
are checked); `dirichlet` and `quantity` first hand one sample to each device (dirichlet: the
first N samples of a seeded permutation, one each; quantity: the size is 1 + a Dirichlet share
of the other n - N) and split the rest by the Dirichlet draw. That changes the skew by at most
one sample per device, which is what a real device with data always has anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fleetlearn.edge_runtime.core.errors import UsageError

SCHEMES = ("iid", "dirichlet", "shards", "quantity")
DEFAULT_BINS = 10
_USAGE = "iid, dirichlet:ALPHA, shards:K or quantity:ALPHA (e.g. dirichlet:0.1)"


class PartitionError(UsageError):
    """A bad partition spec or a partition that cannot be made (one line, exit 2)."""


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed spec: `scheme` and its parameter (α for dirichlet/quantity, k for shards)."""

    scheme: str
    param: float | int | None = None

    def __str__(self) -> str:
        if self.param is None:
            return self.scheme
        return f"{self.scheme}:{self.param:g}" if isinstance(self.param, float) else f"{self.scheme}:{self.param}"


def parse_partition(text: str) -> PartitionSpec:
    """ "iid" | "dirichlet:α" | "shards:k" | "quantity:α" -> PartitionSpec; PartitionError otherwise."""
    if not isinstance(text, str):
        raise PartitionError(f"partition must be a string like {_USAGE}, got {text!r:.40}")
    scheme, sep, value = text.strip().partition(":")
    scheme = scheme.strip().lower()
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition {text!r:.40}; one of {_USAGE}")
    if scheme == "iid":
        if sep:
            raise PartitionError(f"partition {text!r:.40}: iid takes no parameter")
        return PartitionSpec("iid")
    if not value.strip():
        raise PartitionError(
            f"partition {text!r:.40}: {scheme} needs a parameter, e.g. {scheme}:{'2' if scheme == 'shards' else '0.5'}"
        )
    if scheme == "shards":
        try:
            k = int(value)
        except ValueError:
            raise PartitionError(f"partition {text!r:.40}: k must be a positive integer") from None
        if k < 1:
            raise PartitionError(f"partition {text!r:.40}: k must be a positive integer")
        return PartitionSpec("shards", k)
    try:
        alpha = float(value)
    except ValueError:
        raise PartitionError(f"partition {text!r:.40}: alpha must be a number > 0") from None
    if not (math.isfinite(alpha) and 1e-4 <= alpha <= 1e6):
        raise PartitionError(f"partition {text!r:.40}: alpha must be in [1e-4, 1e6]")
    return PartitionSpec(scheme, alpha)


def labels_for(y: np.ndarray, task: str, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Integer classes for the label-based schemes: class indices as they are for a
    classification task, `quantile_classes(y, bins)` for a regression target."""
    y = np.asarray(y)
    if task == "regression":
        return quantile_classes(y.reshape(len(y), -1)[:, 0], bins)
    return y.reshape(len(y)).astype(np.int64)


def quantile_classes(y: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Class c in [0, bins) for each value: the bin between the c/bins and (c+1)/bins quantiles
    of y (equal-count bins; a value equal to a cut goes to the lower bin)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if bins < 1:
        raise PartitionError(f"bins must be >= 1, got {bins}")
    cuts = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(cuts, y, side="left").astype(np.int64)


def _check(n: int, devices: int) -> None:
    if devices < 1:
        raise PartitionError(f"devices must be >= 1, got {devices}")
    if devices > n:
        raise PartitionError(f"cannot give {devices} devices at least one sample each from {n} samples")


def iid(n: int, devices: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into `devices` parts whose sizes differ by at most 1."""
    _check(n, devices)
    return [np.asarray(part, dtype=np.int64) for part in np.array_split(np.random.default_rng(seed).permutation(n), devices)]


def _cut(idx: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """Cut `idx` into len(shares) consecutive parts whose sizes follow `shares` (largest
    remainder rounding, so the sizes sum to len(idx) exactly and deterministically)."""
    raw = shares / shares.sum() * len(idx)
    sizes = np.floor(raw).astype(np.int64)
    short = len(idx) - int(sizes.sum())
    if short:
        # stable argsort of the negated remainders: ties go to the lower device index
        sizes[np.argsort(-(raw - sizes), kind="stable")[:short]] += 1
    return np.split(idx, np.cumsum(sizes)[:-1])


def dirichlet(labels: np.ndarray, devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: for each class c, shares p_c ~ Dir_N(α·1) over the N devices, and device i
    gets a p_c[i] fraction of class c's samples (the per-class form of Hsu et al. 2019's
    q_i ~ Dir(α·p), also used by Yurochkin et al. 2019 and Wang et al. 2020, FedMA; it assigns
    every sample exactly once, where Hsu et al. sample with equal device sizes). One sample of a
    seeded permutation goes to each device first so none is empty."""
    labels = np.asarray(labels).reshape(-1)
    _check(len(labels), devices)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    parts: list[list[np.ndarray]] = [[order[i : i + 1]] for i in range(devices)]
    rest = order[devices:]
    for c in np.unique(labels):
        members = rest[labels[rest] == c]  # already in a seeded random order
        for i, piece in enumerate(_cut(members, rng.dirichlet(np.full(devices, alpha)))):
            parts[i].append(piece)
    return [np.concatenate(p).astype(np.int64) for p in parts]


def shards(labels: np.ndarray, devices: int, k: int, seed: int, sort_key: np.ndarray | None = None) -> list[np.ndarray]:
    """McMahan et al. 2017's pathological non-IID split: sort the samples by label (then by
    `sort_key`, e.g. the raw regression target, then at random), cut the sorted order into N*k
    shards of near-equal size, and deal each device k shards drawn at random."""
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    _check(n, devices)
    if devices * k > n:
        raise PartitionError(f"shards:{k} with {devices} devices needs at least {devices * k} samples, there are {n}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    keys = [labels[shuffled]] if sort_key is None else [np.asarray(sort_key).reshape(-1)[shuffled], labels[shuffled]]
    order = shuffled[np.lexsort(keys)]  # last key is primary: label, then sort_key, then random
    pieces = np.array_split(order, devices * k)
    dealt = rng.permutation(devices * k)
    return [np.concatenate([pieces[j] for j in dealt[i * k : (i + 1) * k]]).astype(np.int64) for i in range(devices)]


def quantity(n: int, devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Size skew with IID contents: device i holds 1 + a q_i share of the other n - N samples,
    q ~ Dir_N(α·1) (Li et al. 2022's quantity skew), cut from a seeded permutation."""
    _check(n, devices)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    q = rng.dirichlet(np.full(devices, alpha))
    rest = _cut(order[devices:], q)
    return [np.concatenate([order[i : i + 1], rest[i]]).astype(np.int64) for i in range(devices)]


def partition(
    spec: PartitionSpec | str, y: np.ndarray, devices: int, seed: int, task: str = "classification"
) -> list[np.ndarray]:
    """Index arrays, one per device, for targets `y` under `spec`; `task` is "regression" when y
    is a continuous target (binned into quantile classes for the label-based schemes)."""
    if isinstance(spec, str):
        spec = parse_partition(spec)
    y = np.asarray(y)
    n = len(y)
    if spec.scheme == "iid":
        return iid(n, devices, seed)
    assert spec.param is not None  # parse_partition gives every other scheme its parameter
    if spec.scheme == "quantity":
        return quantity(n, devices, float(spec.param), seed)
    labels = labels_for(y, task)
    if spec.scheme == "dirichlet":
        return dirichlet(labels, devices, float(spec.param), seed)
    raw = y.reshape(n, -1)[:, 0].astype(np.float64) if task == "regression" else None
    return shards(labels, devices, int(spec.param), seed, sort_key=raw)

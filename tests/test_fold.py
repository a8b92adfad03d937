"""The blocked fold kernels (aggregator/fold.py) against the straightforward float64 expressions
they replace, on random data that spans several blocks and ends in a partial one."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest

from fleetlearn.aggregator.clipping import Clipping, ClippingOptions, clip_delta, l2_norm
from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.fold import BLOCK, Folder, fold, new_scratch
from fleetlearn.aggregator.median import Median
from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.protocol import Update

P = 2 * BLOCK + 12_345  # two whole blocks and a partial one


def _update(delta: np.ndarray, samples: int, device: str = "d0") -> Update:
    return Update("a" * 32, 1, device, "b" * 64, samples, 0.5, 1.0, secrets.token_hex(16), delta)


def _deltas(rng: np.random.Generator, k: int, size: int = P) -> list[np.ndarray]:
    # Mixed magnitudes, like real deltas: a shared direction, per-device noise, a few outliers.
    shared = rng.normal(0, 1e-3, size)
    out = []
    for _ in range(k):
        d = shared + rng.normal(0, 10.0 ** rng.uniform(-5, -1), size)
        d[rng.integers(0, size, 20)] *= 1e4
        out.append(d.astype(np.float32))
    return out


def test_fold_is_bit_identical_to_the_float64_expression():
    rng = np.random.default_rng(11)
    acc, want, scratch = np.zeros(P), np.zeros(P), new_scratch()
    for d in _deltas(rng, 12):
        a, b = float(rng.uniform(0.01, 1.0)), float(rng.integers(1, 2**31 - 1))
        fold(acc, d, a, b, scratch)
        want += (d.astype(np.float64) * a) * b
    assert acc.tobytes() == want.tobytes()
    with pytest.raises(ValueError):
        fold(acc, np.zeros(P - 1, np.float32))


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_threaded_folder_is_bit_identical_to_the_single_threaded_kernels(workers):
    rng = np.random.default_rng(17)
    size = 5 * BLOCK + 777  # six blocks: every worker count splits them differently
    folder, one, many = Folder(workers), np.zeros(size), np.zeros(size)
    for d in _deltas(rng, 4, size):
        a, b = float(rng.uniform(0.1, 1)), float(rng.integers(1, 1000))
        fold(one, d, a, b)
        folder.fold(many, d, a, b)
        assert folder.l2_norm(d) == l2_norm(d)
    assert many.tobytes() == one.tobytes()
    assert folder.l2_norm(np.ones(10, np.float32)) == l2_norm(np.ones(10, np.float32)) == pytest.approx(10**0.5)


def test_fold_sum_stays_within_its_stated_error_of_an_exact_sum():
    """The docstring's bound: |S - exact| <= (k - 1) 2^-53 sum_i |n_i d_i| per coordinate
    (the exact sum taken with Python's math.fsum on a sample of coordinates)."""
    import math

    rng = np.random.default_rng(12)
    deltas, ns = _deltas(rng, 100, size=4096), rng.integers(1, 1000, 100)
    acc = np.zeros(4096)
    for d, n in zip(deltas, ns):
        fold(acc, d, 1.0, float(n))
    terms = np.stack([d.astype(np.float64) * float(n) for d, n in zip(deltas, ns)])
    for j in rng.integers(0, 4096, 200):
        exact = math.fsum(terms[:, j])
        assert abs(acc[j] - exact) <= 99 * 2.0**-53 * np.abs(terms[:, j]).sum()


def test_l2_norm_matches_numpy_in_float64():
    rng = np.random.default_rng(13)
    for d in _deltas(rng, 5):
        assert l2_norm(d) == pytest.approx(np.linalg.norm(d.astype(np.float64)), rel=1e-13)
    assert l2_norm(np.zeros(P, np.float32)) == 0.0


@pytest.mark.parametrize("uniform", [False, True])
def test_fedavg_folds_like_the_unblocked_reference(uniform):
    rng = np.random.default_rng(14)
    w = rng.normal(size=P).astype(np.float32)
    s = FedAvg(uniform=uniform)
    s.begin_round(1, w)
    want = np.zeros(P)
    for i, d in enumerate(_deltas(rng, 6)):
        n = int(rng.integers(1, 10_000))
        s.accumulate(_update(d, n, f"d{i}"))
        want += d.astype(np.float64) * (1.0 if uniform else float(n))
    assert s.aggregate().total.tobytes() == want.tobytes()


@pytest.mark.parametrize("inner", [lambda: FedAvg(), lambda: FedAvg(uniform=True), lambda: Median()])
def test_clipping_folds_the_same_values_as_clip_delta(inner):
    """Clipping hands the rule d * min(1, C/||d||) without a copy (accumulate_scaled): the same
    bytes as handing it clip_delta's float64 array, for a streaming rule and for one that keeps deltas."""
    rng = np.random.default_rng(15)
    w = rng.normal(size=P).astype(np.float32)
    fast, ref = Clipping(inner(), ClippingOptions(0.05)), inner()
    fast.begin_round(1, w)
    ref.begin_round(1, w)
    deltas = _deltas(rng, 5)
    deltas[0] *= np.float32(1e-6)  # one inside the ball: handed on unscaled
    for i, d in enumerate(deltas):
        u = _update(d, int(rng.integers(1, 100)), f"d{i}")
        fast.accumulate(u)
        ref.accumulate(dataclasses.replace(u, delta=clip_delta(d, 0.05)[0]))
    assert fast.step(w, fast.aggregate()).tobytes() == ref.step(w, ref.aggregate()).tobytes()
    assert fast.round_summary()["clipped"] == sum(int(np.linalg.norm(d.astype(np.float64)) > 0.05) for d in deltas) == 4


def test_decoded_float32_delta_is_a_read_only_view_still_checked():
    rng = np.random.default_rng(16)
    d = rng.normal(size=1000).astype(np.float32)
    u = Update.decode(_update(d, 3).encode(), 1000)
    assert u.delta.tobytes() == d.tobytes() and u.delta.dtype == np.float32 and not u.delta.flags.writeable
    d[7] = np.nan
    with pytest.raises(ProtocolError, match="1 NaN/Inf"):
        Update.decode(_update(d, 3).encode(), 1000)


def test_a_failing_block_raises_on_the_calling_thread_instead_of_hanging():
    folder = Folder(2)
    bad = np.zeros(3 * BLOCK, np.complex64)  # complex -> float64 is not a same-kind cast: every block fails
    with pytest.raises(TypeError):
        folder.fold(np.zeros(3 * BLOCK), bad)
    assert folder.l2_norm(np.ones(3 * BLOCK, np.float32)) == pytest.approx((3 * BLOCK) ** 0.5)  # still usable

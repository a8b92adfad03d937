"""The streaming kernels under the mean-based rules: S <- S + a * b * d and ||d||_2, both in
float64, in blocks that stay in cache.

Why blocks: the obvious `S += np.asarray(d, np.float64) * n` allocates two model-sized float64
temporaries per update (a widened copy, then the product) and walks memory four times; each
fresh allocation of that size is also a round of page faults. Here a float32 delta is widened
BLOCK values at a time into one small float64 scratch (reused, never reallocated), scaled in
place and added into S in place, so per update the delta is read once from memory and S is
read and written once (it stays in the last-level cache for a 1M-parameter model: 8 MB).

Precision: exactly the arithmetic of the unblocked expression, element by element:
    S_j <- S_j + fl64(fl64(float64(d_j) * a) * b)      (a multiply by 1.0 is skipped: it is exact)
so the result is bit-identical to `S += (np.asarray(d, np.float64) * a) * b`, whatever BLOCK
is (each element's operations do not depend on its neighbours). The sum over updates is then
the float64 recursive sum in arrival order: its error is at most (k - 1) * 2^-53 * sum_i |a_i b_i d_i|
per coordinate for k updates, below float32 resolution of the mean for any realistic k
(docs/benchmarks.md, "Aggregation throughput", has the float32 alternative we measured and why
it was not taken).

`l2_norm` widens the same way and sums the squares of each block with numpy's pairwise
summation, then adds the block sums in float64: relative error below ~1e-15 for a million values,
independent of BLAS threading.

Memory: BLOCK * 8 bytes of scratch per caller, on top of S; nothing grows with the fleet.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 1 << 17  # values per block: 512 KiB of float32 read, 1 MiB of float64 scratch (measured best of 2^13..2^18)


def new_scratch() -> np.ndarray:
    """The reusable float64 buffer a caller hands to `fold` / `l2_norm` (BLOCK values)."""
    return np.empty(BLOCK, dtype=np.float64)


def _flat(delta: np.ndarray) -> np.ndarray:
    d = np.asarray(delta)
    return d.reshape(-1) if d.ndim != 1 else d


def fold(acc: np.ndarray, delta: np.ndarray, a: float = 1.0, b: float = 1.0, scratch: np.ndarray | None = None) -> None:
    """S <- S + (float64(d) * a) * b in place (acc: float64 (P,), delta: any real dtype, P values)."""
    d = _flat(delta)
    if acc.dtype != np.float64 or acc.shape != d.shape:
        raise ValueError(f"accumulator is {acc.dtype} {acc.shape}, delta {d.shape}: both must hold the same count, S float64")
    sc = new_scratch() if scratch is None else scratch
    a, b = float(a), float(b)
    for start in range(0, d.size, BLOCK):
        stop = min(start + BLOCK, d.size)
        s = sc[: stop - start]
        np.copyto(s, d[start:stop], casting="same_kind")  # the widening, in cache
        if a != 1.0:
            np.multiply(s, a, out=s)
        if b != 1.0:
            np.multiply(s, b, out=s)
        out = acc[start:stop]
        np.add(out, s, out=out)


def l2_norm(delta: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """||d||_2 with the squares summed in float64 (a float32 sum of squares loses digits at 1e6 values)."""
    d = _flat(delta)
    sc = new_scratch() if scratch is None else scratch
    total = 0.0
    for start in range(0, d.size, BLOCK):
        stop = min(start + BLOCK, d.size)
        s = sc[: stop - start]
        np.copyto(s, d[start:stop], casting="same_kind")
        np.multiply(s, s, out=s)
        total += float(np.add.reduce(s))
    return math.sqrt(total)

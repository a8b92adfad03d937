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

Threads (`Folder`): the same arithmetic with its blocks spread over the cores (at most
MAX_WORKERS), for models of two blocks or more; results are bit-identical to the
single-threaded functions.

Memory: BLOCK * 8 bytes of scratch per worker, on top of S; nothing grows with the fleet.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

BLOCK = 1 << 17  # values per block: 512 KiB of float32 read, 1 MiB of float64 scratch (measured best of 2^15..2^18)
MAX_WORKERS = 4  # past a few cores the fold is memory-bound


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


def _block_square_sums(d: np.ndarray, scratch: np.ndarray) -> list[float]:
    """sum(float64(d_j)^2) of each BLOCK of d, in order."""
    out = []
    for start in range(0, d.size, BLOCK):
        stop = min(start + BLOCK, d.size)
        s = scratch[: stop - start]
        np.copyto(s, d[start:stop], casting="same_kind")
        np.multiply(s, s, out=s)
        out.append(float(np.add.reduce(s)))
    return out


def _norm_from(block_sums: list[float]) -> float:
    total = 0.0
    for x in block_sums:  # in block order, whoever computed them: the same float64 result
        total += x
    return math.sqrt(total)


def l2_norm(delta: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """||d||_2 with the squares summed in float64 (a float32 sum of squares loses digits at 1e6 values)."""
    return _norm_from(_block_square_sums(_flat(delta), new_scratch() if scratch is None else scratch))


class Folder:
    """`fold` and `l2_norm` over up to `workers` threads, bit-identical to the single-threaded
    functions: numpy releases the GIL inside its loops, so the calling thread and the pool's
    threads take blocks from one shared counter (each with its own scratch), and the norm's
    block sums are added in block order whoever computed them.

    Why threads: one core widens, scales and adds at ~6 GB/s here, and the fold of a large model
    is embarrassingly parallel. Why a shared counter rather than one fixed half per thread: on a
    busy machine a worker may not get a core for a while; the calling thread then takes its
    blocks too and waits only for blocks a worker has started, so a missing core costs at most
    one block, never half the update. A model of fewer than two blocks (256k values) never
    leaves the calling thread. The pool is this object's, made on first use."""

    def __init__(self, workers: int | None = None):
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = max(1, min(MAX_WORKERS, workers))
        self._scratch = [new_scratch() for _ in range(self.workers)]
        self._pool: ThreadPoolExecutor | None = None

    def _blocks(self, size: int, work: Callable[[int, int, np.ndarray], Any]) -> list[Any]:
        """[work(start, stop, scratch) for every block of `size` values], in block order."""
        count = -(-size // BLOCK)
        if count < 2 or self.workers == 1:
            return [work(i * BLOCK, min((i + 1) * BLOCK, size), self._scratch[0]) for i in range(count)]
        results: list[Any] = [None] * count
        claims = itertools.count()  # next() on it is atomic under the GIL
        done = threading.Condition()
        finished = [0]

        errors: list[BaseException] = []

        def take(scratch: np.ndarray) -> None:
            while (i := next(claims)) < count:
                try:
                    results[i] = work(i * BLOCK, min((i + 1) * BLOCK, size), scratch)
                except BaseException as exc:  # raised again on the calling thread, never lost
                    errors.append(exc)
                finally:
                    with done:
                        finished[0] += 1
                        done.notify()

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="fold")
        for w in range(1, self.workers):
            self._pool.submit(take, self._scratch[w])
        take(self._scratch[0])
        with done:  # only blocks a worker claimed are still running
            done.wait_for(lambda: finished[0] == count)
        if errors:
            raise errors[0]
        return results

    def fold(self, acc: np.ndarray, delta: np.ndarray, a: float = 1.0, b: float = 1.0) -> None:
        """`fold(acc, delta, a, b)`, its blocks spread over the workers."""
        d = _flat(delta)
        if d.size <= BLOCK:  # one block: straight to the kernel (no closure, no list: ~4 us per small update)
            fold(acc, d, a, b, self._scratch[0])
            return
        if acc.dtype != np.float64 or acc.shape != d.shape:
            raise ValueError(f"accumulator is {acc.dtype} {acc.shape}, delta {d.shape}: both must hold the same count, S float64")
        self._blocks(d.size, lambda start, stop, sc: fold(acc[start:stop], d[start:stop], a, b, sc))

    def l2_norm(self, delta: np.ndarray) -> float:
        """`l2_norm(delta)`, the block sums computed over the workers."""
        d = _flat(delta)
        if d.size <= BLOCK:
            return l2_norm(d, self._scratch[0])
        return _norm_from(
            [x for part in self._blocks(d.size, lambda start, stop, sc: _block_square_sums(d[start:stop], sc)) for x in part]
        )

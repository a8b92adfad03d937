"""Per-update L2 norm clipping (`--clip-norm C`): a wrapper around any aggregation rule.

Each accepted delta d_i is scaled into the L2 ball of radius C before it is aggregated:

    clip(d, C) = d * min(1, C / ||d||_2)

so no single device can move the global model by more than C (times its aggregation weight)
in one round. Clipping is a cheap bound on the damage of one update, not a filter: a
malicious update that is clipped still counts with norm C in whatever direction it points
(docs/security-robust-dp.md). It is also the sensitivity bound DP-FedAvg needs
(aggregator/dp_fedavg.py).

`Clipping(rule)` hands the rule clip(d_i, C) instead of d_i and changes nothing else; the
composition is named `clipped-<rule>`. Around FedAvg (`clipped-fedavg`, still sample-weighted
and streaming): w' = w + sum_i n_i * clip(d_i, C) / sum_i n_i. The sample counts n_i are what
devices report; a device that lies about n_i still gets that weight (median and trimmed mean
are unweighted for this reason). Around the median or trimmed mean, the rule keeps the clipped
deltas as float32. The round record's update norms (`update_norm_median`, `update_norm_max`)
are those of the raw deltas, before clipping.

Restart: the clipped count and the raw norms are persisted with the rule's accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlearn.aggregator.fold import Folder
from fleetlearn.aggregator.fold import l2_norm as fold_l2_norm
from fleetlearn.aggregator.options import Options, finite_positive, option
from fleetlearn.aggregator.strategy import Strategy, Wrapper
from fleetlearn.edge_runtime.core.protocol import Update


def l2_norm(delta: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """||d||_2, accumulated in float64 (a float32 sum of squares loses digits at 1e6 params),
    blocked in cache without a widened copy of d (aggregator/fold.py)."""
    return fold_l2_norm(delta, scratch)


def clip_factor(norm: float, clip_norm: float) -> float:
    """min(1, C / ||d||): 1 for a delta already inside the ball (and for the zero delta)."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_delta(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """(d * min(1, C/||d||) as a new float64 array, whether it was scaled down).

    The result's norm is <= C up to float64 rounding (a relative 1e-15), which is what the
    DP sensitivity argument needs; callers that store float32 round once more."""
    d = np.asarray(delta, dtype=np.float64)
    factor = clip_factor(l2_norm(delta), clip_norm)
    return (d * factor if factor < 1.0 else d.copy()), factor < 1.0


@dataclass(frozen=True)
class ClippingOptions(Options):
    clip_norm: float | None = option(
        None,
        "--clip-norm",
        float,
        "clip every update to L2 norm C before aggregating (any strategy)",
        metavar="C",
        check=finite_positive,
        bound="a finite number > 0",
    )


class Clipping(Wrapper):
    """Clip each delta to L2 norm C, then hand it to the inner strategy."""

    prefix = "clipped"
    Options = ClippingOptions

    def __init__(self, inner: Strategy, options: ClippingOptions):
        super().__init__(inner)
        if options.clip_norm is None:
            raise ValueError("Clipping needs a clip norm")
        self.options = options
        self.clip_norm = float(options.clip_norm)
        self._clipped = 0
        self._norms: list[float] = []
        self._folder = Folder()  # the norm over this machine's cores (bit-identical to l2_norm)

    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        self.inner.begin_round(rnd, global_weights)
        self._clipped, self._norms = 0, []

    def accumulate(self, update: Update) -> None:
        # One read of d for its norm, then the rule folds (d * factor) itself (a streaming rule
        # without a scaled copy): the same float64 values clip_delta would hand it.
        norm = self._folder.l2_norm(update.delta)
        factor = clip_factor(norm, self.clip_norm)
        self.inner.accumulate_scaled(update, factor)
        self._clipped += int(factor < 1.0)
        self._norms.append(norm)

    def own_partial_state(self) -> dict[str, Any]:
        return {"clipped": self._clipped, "norms": list(self._norms)}

    def load_own_partial_state(self, state: dict[str, Any]) -> None:
        self._clipped, self._norms = int(state["clipped"]), [float(n) for n in state["norms"]]

    def round_summary(self) -> dict[str, Any]:
        return {**self.inner.round_summary(), **norm_summary(self.clip_norm, self._clipped, self._norms)}


def norm_summary(clip_norm: float | None, clipped: int, norms: list[float]) -> dict[str, Any]:
    """Per-round fields about the raw update norms (before clipping), for rounds.jsonl."""
    out: dict[str, Any] = {}
    if clip_norm is not None:
        out.update(clip_norm=clip_norm, clipped=clipped)
    if norms:
        out["update_norm_median"] = float(np.median(norms))
        out["update_norm_max"] = float(max(norms))
    return out

"""Learning-rate schedules over rounds: the aggregator sends round r's rate in its round config.

A rate that decays over the run lets devices take large steps early and settle late, so the
model the last round publishes is not just wherever the last noisy step left it.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def scheduled_lr(base: float, rnd: int, total: int, schedule: str = "constant", min_factor: float = 0.1, warmup: int = 0) -> float:
    """The learning rate of round `rnd` (1-based) of `total`.

    warmup:   for r <= W (W = warmup rounds), lr_r = base * r / W: small first steps while the
              loss (and so the gradient) is still large; the schedule below then runs over the
              remaining R - W rounds, with r counted from the end of the warm-up.
    constant: lr_r = base.
    cosine:   lr_r = base * (f + (1 - f) * (1 + cos(pi * (r - 1) / R)) / 2), with f = min_factor,
              so round 1 gets `base` and the rate falls smoothly toward f * base at round R.
    """
    if warmup > 0:
        if rnd <= warmup:
            return base * rnd / warmup
        rnd, total = rnd - warmup, max(total - warmup, 1)
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = (rnd - 1) / max(total, 1)
        return base * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule {schedule!r}; one of {SCHEDULES}")

"""Each round's training config: what devices are asked to do (epochs, batch, learning rate,
FedProx's proximal mu).

The engine builds round r's RoundConfig from the TrainingPlan below and sends it in the GLOBAL
frame; strategies never see it (they only aggregate). A learning rate that decays over the run
lets devices take large steps early and settle late, so the model the last round publishes is
not just wherever the last noisy step left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import MAX_PROXIMAL_MU, RoundConfig

SCHEDULES = ("constant", "cosine")


def scheduled_lr(
    base: float, rnd: int, total: int, schedule: str = "constant", min_factor: float = 0.1, warmup: int = 0
) -> float:
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


@dataclass(frozen=True)
class TrainingPlan:
    """The config section for devices' training (None: each device's own setting)."""

    local_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # with a schedule or warm-up and no lr: the bundle's own rate
    max_steps: int | None = None
    lr_schedule: str = "constant"  # or "cosine": decay from lr toward lr * lr_min_factor over the rounds
    lr_min_factor: float = 0.1
    lr_warmup: int = 0  # rounds of linear warm-up before the schedule
    # FedProx (Li et al. 2020): devices minimise loss + mu/2 ||w - w_global||^2. A training-plan
    # option, not an aggregation rule, so it combines with any strategy (--strategy fedprox is
    # FedAvg that insists on mu > 0). None or 0: no term (the key is then not sent at all).
    proximal_mu: float | None = None

    @property
    def scheduled(self) -> bool:
        return self.lr_schedule != "constant" or self.lr_warmup > 0

    def validate(self, rounds: int) -> None:
        """UsageError (one line) for anything out of range; `rounds` is the run's length."""
        for name in ("local_epochs", "batch_size", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.lr is not None and not 0 < self.lr <= 10:
            raise UsageError(f"--lr must be in (0, 10], got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 < self.lr_min_factor <= 1:
            raise UsageError(f"--lr-min-factor must be in (0, 1], got {self.lr_min_factor}")
        if not 0 <= self.lr_warmup < rounds:
            raise UsageError(f"--lr-warmup must be in [0, --rounds), got {self.lr_warmup}")
        mu = self.proximal_mu
        if mu is not None and not (isinstance(mu, (int, float)) and math.isfinite(mu) and 0 <= mu <= MAX_PROXIMAL_MU):
            raise UsageError(f"--proximal-mu must be a finite number in [0, {MAX_PROXIMAL_MU:g}], got {mu}")

    def round_config(self, rnd: int, total_rounds: int, bundle_lr: float) -> RoundConfig:
        """Round `rnd`'s config. A schedule needs a base rate: --lr, else the bundle's `bundle_lr`."""
        base = self.lr if self.lr is not None or not self.scheduled else float(bundle_lr)
        lr = base
        if base is not None and self.scheduled:
            lr = scheduled_lr(base, rnd, total_rounds, self.lr_schedule, self.lr_min_factor, self.lr_warmup)
        return RoundConfig(
            local_epochs=self.local_epochs,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=lr,
            proximal_mu=self.proximal_mu or None,
        )

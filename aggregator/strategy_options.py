"""From the aggregator's robust/DP options to a registered strategy and its keyword options.

    --strategy fedavg                                  -> fedavg (unchanged, bit-identical)
    --strategy fedavg --clip-norm C                    -> clipped-fedavg(clip_norm=C)
    --strategy fedavg --clip-norm C --dp-noise-multiplier s [--dp-delta d] [--dp-population N]
                                                       -> dp-fedavg(C, s, m = target devices, N, d)
    --strategy median [--clip-norm C]                  -> median(clip_norm=C)
    --strategy trimmed-mean [--trim-fraction b] [--clip-norm C] -> trimmed-mean(b, C)

`check_strategy_options(cfg)` raises a one-line UsageError for a combination that makes no
sense; `strategy_options(cfg)` gives (registry name, extra kwargs for make_strategy). `cfg` is
an AggregatorConfig (anything with those attributes).
"""

from __future__ import annotations

from typing import Any

from fleetlearn.edge_runtime.core.errors import UsageError

CLIPPABLE = ("fedavg", "clipped-fedavg", "median", "trimmed-mean", "dp-fedavg")


def check_strategy_options(cfg: Any) -> None:
    from fleetlearn.aggregator.strategy import STRATEGIES

    if cfg.strategy not in STRATEGIES:
        raise UsageError(f"--strategy {cfg.strategy!r} is not one of: {', '.join(sorted(STRATEGIES))}")
    if cfg.clip_norm is not None and not 0 < cfg.clip_norm < float("inf"):
        raise UsageError(f"--clip-norm must be a finite number > 0, got {cfg.clip_norm}")
    if not 0 <= cfg.trim_fraction < 0.5:
        raise UsageError(f"--trim-fraction must be in [0, 0.5), got {cfg.trim_fraction}")
    if cfg.clip_norm is not None and cfg.strategy not in CLIPPABLE:
        raise UsageError(f"--clip-norm does not apply to --strategy {cfg.strategy}")
    if cfg.strategy == "clipped-fedavg" and cfg.clip_norm is None:
        raise UsageError("--strategy clipped-fedavg needs --clip-norm")
    dp = cfg.dp_noise_multiplier is not None
    if cfg.strategy == "dp-fedavg" and not dp:
        raise UsageError("--strategy dp-fedavg needs --dp-noise-multiplier and --clip-norm")
    if dp:
        if cfg.strategy not in ("fedavg", "dp-fedavg"):
            raise UsageError(f"--dp-noise-multiplier works with --strategy fedavg (DP-FedAvg), not {cfg.strategy}: the median and trimmed mean have no noise calibration here")
        if not 0 < cfg.dp_noise_multiplier < float("inf"):
            raise UsageError(f"--dp-noise-multiplier must be a finite number > 0, got {cfg.dp_noise_multiplier}")
        if cfg.clip_norm is None:
            raise UsageError("--dp-noise-multiplier needs --clip-norm (the sensitivity the noise is scaled to)")
    if not 0 < cfg.dp_delta < 1:
        raise UsageError(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    if cfg.dp_population is not None:
        if not dp:
            raise UsageError("--dp-population applies with --dp-noise-multiplier only")
        if cfg.dp_population < cfg.target:
            raise UsageError(f"--dp-population {cfg.dp_population} is below --target-devices {cfg.target} (the devices a round takes)")


def strategy_options(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(registry name, extra make_strategy kwargs); ("fedavg", {}) for the defaults."""
    name = cfg.strategy
    if cfg.dp_noise_multiplier is not None:
        return "dp-fedavg", {
            "clip_norm": cfg.clip_norm,
            "noise_multiplier": cfg.dp_noise_multiplier,
            "expected_participants": cfg.target,
            "population": cfg.dp_population,
            "dp_delta": cfg.dp_delta,
        }
    extra: dict[str, Any] = {}
    if cfg.clip_norm is not None:
        extra["clip_norm"] = cfg.clip_norm
        if name == "fedavg":
            name = "clipped-fedavg"
    if name == "trimmed-mean":
        extra["trim_fraction"] = cfg.trim_fraction
    return name, extra

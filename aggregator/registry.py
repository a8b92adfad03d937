"""The one list of strategies, and how the aggregator's options become one composed strategy.

    --strategy NAME [its options]  [--clip-norm C]  [--dp-noise-multiplier S --dp-delta D ...]
        -> DPNoise(Clipping(Rule(options, uniform=True), C), ...)   with DP
        -> Clipping(Rule(options), C)                                with --clip-norm only
        -> Rule(options)                                             otherwise

Aggregation rules and server optimizers are registered below, one line each; the wrappers
(clipping, DP noise) apply to any of them where the math allows (DP needs a mean-based rule).
`clipped-fedavg` and `dp-fedavg` are aliases that build the composition and insist on its
options. Which option belongs to which strategy, and which wrappers a rule admits, is decided here;
bounds are checked once, by each component: single values in its Options dataclass
(aggregator/options.py), values against the round policy where they meet it (DP's noise
denominator here, client sampling in sampling.py and config.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetlearn.aggregator.options import Options, flag_names
from fleetlearn.aggregator.strategy import Strategy
from fleetlearn.edge_runtime.core.errors import UsageError

# name -> "module:Class": an aggregation rule or a server optimizer, one file each.
STRATEGIES: dict[str, str] = {
    "fedavg": "fleetlearn.aggregator.fedavg:FedAvg",
    "median": "fleetlearn.aggregator.median:Median",
    "trimmed-mean": "fleetlearn.aggregator.trimmed_mean:TrimmedMean",
    "fedavgm": "fleetlearn.aggregator.fedavgm:FedAvgM",
    "fedadam": "fleetlearn.aggregator.fedadam:FedAdam",
    "fedyogi": "fleetlearn.aggregator.fedyogi:FedYogi",
    "fedadagrad": "fleetlearn.aggregator.fedadagrad:FedAdagrad",
}
# name -> (strategy, the wrapper option it needs): the compositions that used to be classes.
ALIASES: dict[str, tuple[str, str]] = {
    "clipped-fedavg": ("fedavg", "clip_norm"),
    "dp-fedavg": ("fedavg", "noise_multiplier"),
    "fedprox": ("fedavg", "proximal_mu"),  # FedAvg + devices' proximal term (a training-plan option: schedule.py)
}
CLIPPING = "fleetlearn.aggregator.clipping:Clipping"
DP_NOISE = "fleetlearn.aggregator.dp_fedavg:DPNoise"


def _load(target: str) -> Any:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def strategy_names() -> list[str]:
    return [*STRATEGIES, *ALIASES]


def strategy_class(name: str) -> type[Strategy]:
    """The registered class of a strategy name (aliases resolve to their rule)."""
    base = ALIASES[name][0] if name in ALIASES else name
    if base not in STRATEGIES:
        raise UsageError(f"--strategy {name!r} is not one of: {', '.join(strategy_names())}")
    return _load(STRATEGIES[base])


def all_option_classes() -> list[type[Options]]:
    """Every component's options, for the CLI: the rules' in registry order, then the wrappers'."""
    out: list[type[Options]] = []
    for target in [*STRATEGIES.values(), CLIPPING, DP_NOISE]:
        cls = _load(target).Options
        if cls not in out:
            out.append(cls)
    return out


def option_owners() -> dict[type[Options], str]:
    """Options class -> the strategy names that use it ("fedadam"), for --help's defaults."""
    out: dict[type[Options], list[str]] = {}
    for name, target in STRATEGIES.items():
        out.setdefault(_load(target).Options, []).append(name)
    return {cls: "/".join(names) for cls, names in out.items()}


@dataclass(frozen=True)
class StrategyChoice:
    """The config section: a strategy name and the options given for it (field name -> value;
    an option not given keeps its component's default)."""

    name: str = "fedavg"
    options: Mapping[str, Any] = field(default_factory=dict)

    def validate(self, target_devices: int, proximal_mu: float | None = None) -> None:
        """UsageError (one line) for an unknown name, an option that does not belong, a bad value.
        `proximal_mu` is the training plan's (--proximal-mu), which fedprox insists on."""
        if self.name in ALIASES and ALIASES[self.name][1] == "proximal_mu" and not (proximal_mu is not None and proximal_mu > 0):
            raise UsageError(f"--strategy {self.name} needs --proximal-mu MU > 0 (FedProx's proximal weight, e.g. 0.01)")
        self.build(target_devices)

    def build(self, target_devices: int) -> Strategy:
        """The composed strategy. `target_devices` is DP-FedAvg's expected participant count m."""
        from fleetlearn.aggregator.clipping import Clipping
        from fleetlearn.aggregator.dp_fedavg import DPNoise
        from fleetlearn.aggregator.fedavg import FedAvg

        name, given = self.name, {k: v for k, v in self.options.items() if v is not None}  # None: not given
        rule_cls = strategy_class(name)
        clip_flags, dp_flags = Clipping.Options.flags(), DPNoise.Options.flags()
        valid = {**rule_cls.Options.flags(), **clip_flags, **dp_flags}
        foreign = [k for k in given if k not in valid]
        if foreign:
            known = {n: f.flag for cls in all_option_classes() for n, f in cls.flags().items()}
            flags = ", ".join(known.get(k, k) for k in foreign)
            raise UsageError(
                f"{flags} does not apply to --strategy {name}; its options: {', '.join(flag_names([rule_cls.Options, Clipping.Options, DPNoise.Options]))}"
            )
        if name in ALIASES:
            needs = ALIASES[name][1]
            if needs == "clip_norm" and given.get("clip_norm") is None:
                raise UsageError(f"--strategy {name} needs --clip-norm")
            if needs == "noise_multiplier" and given.get("noise_multiplier") is None:
                raise UsageError(f"--strategy {name} needs --dp-noise-multiplier and --clip-norm")
        rule_opts = rule_cls.Options.from_values(given)
        clip = Clipping.Options.from_values(given)
        dp = DPNoise.Options.from_values(given)
        dp_on = dp.noise_multiplier is not None
        if not dp_on:
            stray = [dp_flags[k].flag for k in given if k in dp_flags and k != "noise_multiplier"]
            if stray:
                raise UsageError(f"{', '.join(stray)} applies with --dp-noise-multiplier only")
            strategy: Strategy = rule_cls(rule_opts)
            return Clipping(strategy, clip) if clip.clip_norm is not None else strategy
        if not issubclass(rule_cls, FedAvg):
            mean_based = [n for n in STRATEGIES if issubclass(strategy_class(n), FedAvg)]
            raise UsageError(
                f"--dp-noise-multiplier works with --strategy {' / '.join(mean_based)}, not {name}: the median and trimmed mean have no noise calibration here"
            )
        if clip.clip_norm is None:
            raise UsageError("--dp-noise-multiplier needs --clip-norm (the sensitivity the noise is scaled to)")
        return DPNoise(Clipping(rule_cls(rule_opts, uniform=True), clip), dp, expected_participants=target_devices)


def make_strategy(name: str = "fedavg", target_devices: int = 1, **options: Any) -> Strategy:
    """Build a strategy from a name and option values (Python API and tests); UsageError on bad input."""
    return StrategyChoice(name, options).build(target_devices)

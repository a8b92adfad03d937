"""The grid file of `fleetlearn experiment`: strict TOML, one-line errors (exit 2) before anything runs.

    model = "digits-mlp"            # a built-in model (export/models.py)
    data = "digits"                 # "boston", "digits" or an NPZ (x_train, y_train, x_test, y_test),
                                    # relative to this file; default: the model's own data set
    devices = 10
    rounds = 30
    local_epochs = 1                # default 1
    batch_size = 16                 # default 8
    optimizer = "sgd"               # on-device optimizer, sgd or adamw (default sgd)
    lr = 0.05
    lr_schedule = "constant"        # or "cosine" (then lr_min_factor, default 0.1); lr_warmup rounds (default 0)
    deadline = 60                   # seconds a round stays open (default 60)
    seeds = [0, 1, 2]
    partitions = ["iid", "dirichlet:0.1"]
    metric = "test_accuracy"        # default: the model's headline (test_mse or test_accuracy)
    target = 0.9                    # rounds-to-target: first round with metric >= (accuracy) or <= (mse, loss)
    validation = 0.2                # optional: hold out this fraction of the TRAINING split (seeded,
                                    # stratified by label for classification) and report the test_*
                                    # metrics on it; the test split is not used. For tuning grids.

    [[strategies]]                  # aggregator options, passed through verbatim
    name = "fedavg"
    [[strategies]]
    name = "fedadam"
    args = ["--server-lr", "0.01"]
    label = "fedadam-0.01"          # optional; needed when two entries share a name

Strategy args are checked at load time with the aggregator's own parser and validation, so a
strategy or option the aggregator does not know fails here, once, not in every cell; options
the experiment itself sets (rounds, devices, lr, ...) are refused in `args`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError, UsageError
from fleetlearn.edge_runtime.core.partition import PartitionError, PartitionSpec, parse_partition

MODEL_DATA = {"boston-mlp": "boston", "digits-mlp": "digits", "digits-cnn": "digits"}
# Metric -> True when larger is better. The aggregator logs test_mse (regression) or
# test_accuracy (classification) and test_loss for both.
METRICS = {"test_mse": False, "test_accuracy": True, "test_loss": False}
_KEYS = {"model", "data", "devices", "rounds", "local_epochs", "batch_size", "optimizer", "lr", "lr_schedule", "lr_warmup",
         "lr_min_factor", "deadline", "run_timeout", "seeds", "partitions", "metric", "target", "strategies", "validation"}  # fmt: skip
_STRATEGY_KEYS = {"name", "args", "label"}
# Aggregator destinations the experiment sets itself; a strategy's args may not change them.
_CONTROLLED = ("bundle", "model", "broker", "fleet", "rounds", "min_devices", "target_devices", "deadline", "state_dir",
               "test_data", "lr", "lr_schedule", "lr_warmup", "lr_min_factor", "local_epochs", "batch_size",
               "round_interval", "strategy")  # fmt: skip


@dataclass(frozen=True)
class Strategy:
    label: str  # unique within the grid: the row name in the tables and the run folder's name
    name: str  # --strategy NAME
    args: tuple[str, ...] = ()

    def aggregator_args(self) -> tuple[str, ...]:
        return ("--strategy", self.name, *self.args)


@dataclass(frozen=True)
class Grid:
    path: Path
    model: str
    task: str  # regression | classification
    data: Path
    devices: int
    rounds: int
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    lr_schedule: str
    lr_warmup: int
    lr_min_factor: float
    deadline: float
    run_timeout: float
    seeds: tuple[int, ...]
    partitions: tuple[PartitionSpec, ...]
    metric: str
    target: float
    strategies: tuple[Strategy, ...]
    validation: float = 0.0  # > 0: evaluate on this fraction of the training split, never on the test split

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def schedule_args(self) -> tuple[str, ...]:
        return ("--lr", repr(self.lr), "--lr-schedule", self.lr_schedule, "--lr-warmup", str(self.lr_warmup),
                "--lr-min-factor", repr(self.lr_min_factor))  # fmt: skip


def _int(doc: dict[str, Any], key: str, default: int | None = None, lo: int = 1, hi: int = 10**6) -> int:
    v = doc.get(key, default)
    if v is None:
        raise ConfigError(f"{key} is required (an integer in [{lo}, {hi}])")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _float(doc: dict[str, Any], key: str, default: float | None, lo: float, hi: float, lo_open: bool = True) -> float:
    v = doc.get(key, default)
    if v is None:
        raise ConfigError(f"{key} is required (a number in {'(' if lo_open else '['}{lo:g}, {hi:g}])")
    ok = (
        not isinstance(v, bool)
        and isinstance(v, (int, float))
        and math.isfinite(v)
        and (lo < v if lo_open else lo <= v)
        and v <= hi
    )
    if not ok:
        raise ConfigError(f"{key} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r:.40}")
    return float(v)


def _choice(doc: dict[str, Any], key: str, default: str | None, choices: tuple[str, ...]) -> str:
    v = doc.get(key, default)
    if v not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {v!r:.40}")
    return v


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    v = doc.get(key)
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{key} must be a non-empty list")
    return v


def _strategies(raw: Any) -> tuple[Strategy, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
        raise ConfigError('strategies must be a non-empty array of tables, e.g. [[strategies]] name = "fedavg"')
    out: list[Strategy] = []
    for i, t in enumerate(raw):
        where = f"strategies[{i}]"
        unknown = sorted(set(t) - _STRATEGY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; one of {', '.join(sorted(_STRATEGY_KEYS))}")
        name, args = t.get("name"), t.get("args", [])
        if not isinstance(name, str) or not name.strip() or name.startswith("-"):
            raise ConfigError(f'{where}: name must be a strategy name such as "fedavg", got {name!r:.40}')
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f'{where}: args must be a list of strings (aggregator options), e.g. ["--clip-norm", "1.0"]')
        label = t.get("label", name)
        if not isinstance(label, str) or not label or len(label) > 40 or not all(c.isalnum() or c in "-_." for c in label):
            raise ConfigError(f"{where}: label must be 1-40 letters, digits, '-', '_' or '.', got {label!r:.40}")
        if any(s.label == label for s in out):
            raise ConfigError(f"{where}: label {label!r} is used twice (give each entry its own label)")
        out.append(Strategy(label, name, tuple(args)))
    return tuple(out)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None):  # --help, --version
        raise UsageError("asks the aggregator to print help and exit")


def check_strategy(grid_base: list[str], strategy: Strategy) -> None:
    """Parse the aggregator command a run would use with the aggregator's own parser and run its
    config validation (unknown strategies, options that do not belong to it, bad values);
    refuse args that change what the experiment sets. ConfigError naming the entry otherwise."""
    from fleetlearn.aggregator.cli import add_arguments, config_from_args

    def parse(argv: list[str]) -> argparse.Namespace:
        parser = _RaisingParser(prog="fleetlearn aggregator", add_help=False)
        add_arguments(parser)
        return parser.parse_args(argv)

    where = f"strategy {strategy.label!r}"
    try:
        full = parse([*grid_base, *strategy.aggregator_args()])
        config_from_args(full).validate()
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    ours = parse([*grid_base, "--strategy", strategy.name])
    changed = [d for d in _CONTROLLED if getattr(full, d) != getattr(ours, d)]
    if changed:
        raise ConfigError(f"{where}: args set --{changed[0].replace('_', '-')}, which the grid controls (use its top-level key)")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; ConfigError (one line, exit 2) on anything wrong."""
    from fleetlearn.edge_runtime.core.files import read_toml
    from fleetlearn.export.models import BUILTIN_MODELS
    from fleetlearn.local_fleet import DATASETS

    path = Path(path)
    doc = read_toml(path, "grid")
    try:
        return _build(path, doc, BUILTIN_MODELS, DATASETS)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _build(path: Path, doc: dict[str, Any], models: Any, datasets: dict[str, Path]) -> Grid:
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; one of {', '.join(sorted(_KEYS))}")
    model = doc.get("model")
    if model not in MODEL_DATA or model not in models:
        raise ConfigError(f"model must be one of {', '.join(MODEL_DATA)}, got {model!r:.40}")
    task = models[model].task
    data_name = doc.get("data", MODEL_DATA[model])
    if not isinstance(data_name, str) or not data_name:
        raise ConfigError(f"data must be {' or '.join(datasets)} or a path to an NPZ, got {data_name!r:.40}")
    data = datasets.get(data_name) or (path.parent / data_name)
    rounds = _int(doc, "rounds", None, 1, 100_000)
    deadline = _float(doc, "deadline", 60.0, 0, 86_400)
    seeds = _list(doc, "seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct integers in [0, 2^31), got {seeds!r:.60}")
    partitions: list[PartitionSpec] = []
    for text in _list(doc, "partitions"):
        try:
            spec = parse_partition(text)
        except PartitionError as exc:
            raise ConfigError(f"partitions: {exc}") from None
        if spec in partitions:
            raise ConfigError(f"partitions: {spec} is listed twice")
        partitions.append(spec)
    metric_default = "test_mse" if task == "regression" else "test_accuracy"
    metric = _choice(doc, "metric", metric_default, ("test_loss", metric_default))
    target = doc.get("target")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ConfigError(f"target must be a number (the {metric} value for rounds-to-target), got {target!r:.40}")
    if metric == "test_accuracy" and not 0 < target <= 1:
        raise ConfigError(f"target must be an accuracy in (0, 1], got {target!r}")
    lr_warmup = _int(doc, "lr_warmup", 0, 0, 100_000)
    if lr_warmup >= rounds:
        raise ConfigError(f"lr_warmup must be below rounds ({rounds}), got {lr_warmup}")
    return Grid(
        path=path, model=model, task=task, data=data, devices=_int(doc, "devices", None, 1, 1000), rounds=rounds,
        local_epochs=_int(doc, "local_epochs", 1, 1, 10_000), batch_size=_int(doc, "batch_size", 8, 1, 1_000_000),
        optimizer=_choice(doc, "optimizer", "sgd", ("sgd", "adamw")), lr=_float(doc, "lr", None, 0, 10),
        lr_schedule=_choice(doc, "lr_schedule", "constant", ("constant", "cosine")), lr_warmup=lr_warmup,
        lr_min_factor=_float(doc, "lr_min_factor", 0.1, 0, 1), deadline=deadline,
        run_timeout=_float(doc, "run_timeout", 120 + 4 * rounds * deadline, 0, 10**7),
        seeds=tuple(seeds), partitions=tuple(partitions), metric=metric, target=float(target),
        strategies=_strategies(doc.get("strategies")), validation=_float(doc, "validation", 0.0, 0, 0.5, lo_open=False),
    )  # fmt: skip


def check_grid_strategies(grid: Grid) -> None:
    """Every strategy entry through the aggregator's parser and validation (see check_strategy)."""
    base = ["--bundle", "bundle", "--broker", "mqtt://127.0.0.1:1883", "--fleet", "experiment", "--rounds", str(grid.rounds),
            "--min-devices", str(grid.devices), "--target-devices", str(grid.devices), "--deadline", str(grid.deadline),
            "--state-dir", "state", "--test-data", "test.npz", *grid.schedule_args()]  # fmt: skip
    for s in grid.strategies:
        try:
            check_strategy(base, s)
        except ConfigError as exc:
            raise ConfigError(f"{grid.path}: {exc}") from None

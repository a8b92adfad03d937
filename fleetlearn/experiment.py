"""Run a grid of strategy x partition x seed on a local fleet and tabulate what it learned.

`fleetlearn experiment --config grid.toml --out DIR`: every run is a real aggregator process,
real device processes (the `fleetlearn device` code path) and a real broker (a fresh local
broker process per run: mosquitto when installed, else embedded amqtt; its log beside the others, or --broker URL), one run after another. DIR receives:

  results.md, results.csv   one row per (strategy, partition): final metric mean and 95%
                            t-interval over seeds, rounds-to-target, central baseline
  runs.csv                  one row per run (the numbers behind the tables)
  grid.toml                 a copy of the grid that produced them
  bundles/seed-S/           the exported model for seed S (initial weights), shared by its runs
  runs/STRATEGY/PARTITION/seed-S/   state/ (aggregator state, rounds.jsonl), logs/, shards

A run that fails (aggregator exit code, timeout, missing rounds) is recorded with its reason
and the grid goes on. Exit 0 when every run finished, 1 when some failed, 2 for a bad grid.
docs/learning.md explains how to read the tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import ConfigError, UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the grid file (TOML; see experiments/*.toml and docs/learning.md)")
    p.add_argument("--out", required=True, type=Path, help="results and per-run state go here (must be empty or not exist)")
    p.add_argument(
        "--broker",
        default=None,
        help="use this MQTT broker URL instead of a fresh local broker per run (mosquitto when installed, else embedded amqtt)",
    )
    p.add_argument("--check", action="store_true", help="validate the grid (and its strategies, partitions, data) and exit")


def _say(text: str) -> None:
    print(text, flush=True)


def _partition_dir(spec: object) -> str:
    return str(spec).replace(":", "-")


def _load_data(grid):
    """The grid's split, checked against the model's input; the run's training targets for
    partitioning. With `validation`, the evaluated set is carved from the training split."""
    from fleetlearn.export.models import BUILTIN_MODELS
    from fleetlearn.local_fleet import holdout, load_split

    split = load_split(grid.data)
    if grid.validation > 0:
        try:
            split = holdout(split, grid.validation, stratify=grid.task == "classification")
        except UsageError as exc:
            raise ConfigError(f"{grid.path}: {exc}") from None
    width = 1
    for d in BUILTIN_MODELS[grid.model].input_shape:
        width *= d
    if split.x_train[0].size != width or split.x_test[0].size != width:
        raise ConfigError(
            f"{grid.path}: data {grid.data} has {split.x_train[0].size} features per sample, {grid.model} takes {width}"
        )
    return split


def _plan(grid, split) -> dict:
    """Every (partition, seed) split, made up front so an impossible one is a grid error (exit 2)."""
    from fleetlearn.edge_runtime.core.partition import PartitionError, partition

    parts = {}
    for spec in grid.partitions:
        for seed in grid.seeds:
            try:
                parts[(str(spec), seed)] = partition(spec, split.y_train, grid.devices, seed, task=grid.task)
            except PartitionError as exc:
                raise ConfigError(f"{grid.path}: partition {spec} with {grid.devices} devices: {exc}") from None
    return parts


def run(args: argparse.Namespace) -> int:
    from fleetlearn.experiment_config import check_grid_strategies, load_grid

    grid = load_grid(args.config)
    check_grid_strategies(grid)
    split = _load_data(grid)
    plan = _plan(grid, split)
    total = len(grid.strategies) * len(grid.partitions) * len(grid.seeds)
    if args.check:
        _say(
            f"{args.config}: ok ({total} runs: {len(grid.strategies)} strategies x {len(grid.partitions)} partitions x {len(grid.seeds)} seeds)"
        )
        return 0
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory (results of an earlier experiment?)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.config, out / "grid.toml")
    _say(f"fleetlearn experiment: {total} runs of {grid.rounds} rounds, {grid.devices} devices each; results in {out}")
    seeds = _prepare_seeds(grid, split, out)
    runs = []
    index = 0
    token = os.urandom(3).hex()  # fleet names unique per experiment, in case --broker is shared
    for strategy in grid.strategies:
        for spec in grid.partitions:
            for seed in grid.seeds:
                index += 1
                run_dir = out / "runs" / strategy.label / _partition_dir(spec) / f"seed-{seed}"
                result = _run_one(grid, split, strategy, str(spec), seed, plan[(str(spec), seed)], seeds[seed], run_dir,
                                  fleet=f"exp-{token}-{index}", broker=args.broker)  # fmt: skip
                runs.append(result)
                _say(f"[{index}/{total}] {_describe(result, grid)}")
                _write_results(grid, runs, out)
    failed = sum(r.status != "ok" for r in runs)
    _say(f"done: {total - failed}/{total} runs finished; see {out / 'results.md'}")
    return 1 if failed else 0


def _prepare_seeds(grid, split, out: Path) -> dict:
    """Per seed: the exported bundle (initial weights from the seed) and the central baseline."""
    import numpy as np

    from fleetlearn.local_fleet import central_baseline, export_builtin

    data = out / "data"
    data.mkdir()
    train, test = data / "train.npz", data / "test.npz"
    np.savez(train, x=split.x_train, y=split.y_train)
    np.savez(test, x=split.x_test, y=split.y_test)
    seeds = {}
    for seed in grid.seeds:
        bundle = export_builtin(
            grid.model, split.x_train, out / "bundles" / f"seed-{seed}", optimizer=grid.optimizer, lr=grid.lr, seed=seed
        )
        t0 = time.perf_counter()
        try:
            name, value = central_baseline(bundle, train, test, rounds=grid.rounds, local_epochs=grid.local_epochs,
                                           batch_size=grid.batch_size, lr=grid.lr, schedule=grid.lr_schedule,
                                           min_factor=grid.lr_min_factor, warmup=grid.lr_warmup, seed=seed)  # fmt: skip
            central = value if name == grid.metric else None
            if name != grid.metric:  # e.g. metric test_loss: the baseline reports the headline only
                _say(f"central baseline for seed {seed} reports {name}, not {grid.metric}: left out")
        except Exception as exc:  # the tables still have the federated numbers
            central = None
            _say(f"central baseline for seed {seed} failed: {str(exc)[:200]}")
        else:
            _say(
                f"seed {seed}: exported {grid.model}; central baseline {grid.metric} {central} ({time.perf_counter() - t0:.1f}s)"
            )
        seeds[seed] = (bundle, train, test, central)
    return seeds


def _run_one(grid, split, strategy, partition: str, seed: int, parts, prepared, run_dir: Path, *, fleet: str, broker: str | None):
    from fleetlearn.experiment_results import RunResult, read_metric_series, rounds_to_target
    from fleetlearn.local_fleet import BrokerProcess, FleetSpec, LocalFleet, write_shards

    bundle, _, test, central = prepared
    result = RunResult(strategy.label, partition, seed, "failed", central=central, dir=str(run_dir))
    work = run_dir / "work"
    work.mkdir(parents=True)
    spec = FleetSpec(bundle=bundle, work=work, state=run_dir / "state", logs=run_dir / "logs", test_data=test, fleet=fleet,
                     rounds=grid.rounds, batch_size=grid.batch_size, local_epochs=grid.local_epochs, seed=seed,
                     deadline=grid.deadline, aggregator_args=(*grid.schedule_args(), *strategy.aggregator_args()))  # fmt: skip
    t0 = time.monotonic()
    handle = None
    try:
        spec.logs.mkdir(parents=True)
        if broker is None:
            handle = BrokerProcess(spec.logs / "broker.log").start()
            url = handle.url
        else:
            url = broker
        shards = write_shards(work, split.x_train, split.y_train, parts)
        with LocalFleet(spec, url, shards) as local:
            code = local.wait(grid.run_timeout)
            why = local.failure_reason()
        if code is None:
            result.reason = f"timed out after {grid.run_timeout:g}s (run_timeout)"
        elif code != 0:
            result.reason = f"aggregator exited with code {code}: {why}"
        else:
            series = read_metric_series(spec.state, grid.metric)
            result.rounds = len(series)
            if len(series) != grid.rounds or series[-1][0] != grid.rounds:
                result.reason = f"the round log has {grid.metric} for {len(series)} of {grid.rounds} rounds"
            else:
                result.status, result.final = "ok", series[-1][1]
                result.rounds_to_target = rounds_to_target(series, grid.target, grid.higher_is_better)
    except Exception as exc:  # one run's trouble must not stop the grid
        result.reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        if handle is not None:
            handle.stop()
    result.wall_s = time.monotonic() - t0
    result.reason = result.reason.replace("\n", " ")
    return result


def _describe(r, grid) -> str:
    head = f"{r.strategy} / {r.partition} / seed {r.seed}: "
    if r.status != "ok":
        return head + f"FAILED ({r.reason[:300]})"
    rtt = f"target at round {r.rounds_to_target}" if r.rounds_to_target is not None else "target not reached"
    return head + f"{grid.metric} {r.final:.4g} after {r.rounds} rounds, {rtt} ({r.wall_s:.1f}s)"


def _write_results(grid, runs, out: Path) -> None:
    """Rewritten after every run (atomically), so an interrupted grid leaves its tables so far."""
    from fleetlearn.edge_runtime.core.files import atomic_write_bytes
    from fleetlearn.experiment_results import results_csv, results_markdown, runs_csv

    setup = (f"{grid.model} on `{grid.data.name}`, {grid.devices} devices, {grid.rounds} rounds x {grid.local_epochs} local "
             f"epoch(s), batch {grid.batch_size}, {grid.optimizer} lr {grid.lr:g} ({grid.lr_schedule}), seeds "
             f"{', '.join(map(str, grid.seeds))}; grid `{grid.path.name}`.")  # fmt: skip
    if grid.validation > 0:
        setup += (
            f" VALIDATION run: the test_* metrics (and central) are on a {grid.validation:g} hold-out of the "
            "training split; the test split was not used."
        )
    atomic_write_bytes(out / "results.csv", results_csv(runs, grid.metric, grid.target).encode(), durable=False)
    atomic_write_bytes(out / "runs.csv", runs_csv(runs).encode(), durable=False)
    md = results_markdown(runs, title="fleetlearn experiment", setup=setup, metric=grid.metric, target=grid.target,
                          higher_is_better=grid.higher_is_better)  # fmt: skip
    atomic_write_bytes(out / "results.md", md.encode(), durable=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `fleetlearn experiment`")

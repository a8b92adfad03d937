"""A whole fleet on this machine: broker, one aggregator process, N device processes.

The shared machinery of `fleetlearn demo` and `fleetlearn experiment` (and what a local swarm
can build on): the processes run the same code paths as a real deployment, `fleetlearn
aggregator` and `fleetlearn device` started with `python -m fleetlearn.cli`, talking MQTT
through a real broker (the embedded amqtt one unless a URL is given).

  split = load_split(path)                           # x_train, y_train, x_test, y_test
  bundle = export_builtin("boston-mlp", split.x_train, out, optimizer="sgd", lr=3e-3, seed=0)
  url, broker = start_broker(None)                   # or start_broker("mqtt://...")
  spec = FleetSpec(bundle, work, state, logs, test, fleet="demo", rounds=5, ...)
  with LocalFleet(spec, url, shard_files) as fleet:
      code = fleet.wait(timeout)                     # the aggregator's exit code
  central_baseline(...)                              # the same bundle trained on all the data
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleetlearn.edge_runtime.core.errors import UsageError

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Built-in data names -> the committed splits (data/README.md has their provenance).
DATASETS = {"boston": REPO_DATA_DIR / "boston_housing_split.npz", "digits": REPO_DATA_DIR / "digits_split.npz"}
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Split:
    """A train/test split as float64 features and raw targets (class indices or values)."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any


def load_split(path: str | Path) -> Split:
    """An NPZ holding x_train, y_train, x_test, y_test (no pickles). UsageError, one line, if not."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: data split not found (an NPZ with {', '.join(SPLIT_KEYS)})")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in SPLIT_KEYS if k not in d.files]
            if missing:
                raise UsageError(f"{path}: the NPZ lacks {', '.join(missing)} (needs {', '.join(SPLIT_KEYS)})")
            x, y, xt, yt = (np.asarray(d[k]) for k in SPLIT_KEYS)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable NPZ ({str(exc)[:100]})") from None
    if len(x) != len(y) or len(xt) != len(yt) or len(x) == 0 or len(xt) == 0:
        raise UsageError(f"{path}: x/y row counts differ or a split is empty")
    return Split(x.astype(np.float64), y, xt.astype(np.float64), yt)


def holdout(split: Split, fraction: float, *, stratify: bool, seed: int = 0) -> Split:
    """A validation split carved from the TRAINING split: round(fraction * n) training rows
    (per label when `stratify`, so every class keeps its share) become the evaluated set and the
    rest the training set; the original test split is dropped, so settings tuned on the result
    never saw it. Seeded and deterministic (the same rows for every experiment seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(split.y_train)
    groups = [np.flatnonzero(split.y_train == c) for c in np.unique(split.y_train)] if stratify else [np.arange(n)]
    held = np.sort(np.concatenate([rng.permutation(g)[: int(round(fraction * len(g)))] for g in groups]))
    keep = np.setdiff1d(np.arange(n), held)
    if len(held) == 0 or len(keep) == 0:
        raise UsageError(f"validation {fraction:g} of {n} training rows leaves an empty split")
    return Split(split.x_train[keep], split.y_train[keep], split.x_train[held], split.y_train[held])


def export_builtin(model: str, x_train: Any, out: Path, *, optimizer: str, lr: float, seed: int) -> Path:
    """Export a built-in model (export/models.py) to `out`, standardised with the training
    split's statistics (recorded in the bundle, so every device applies the same ones)."""
    from fleetlearn.export import build_bundle, resolve_model
    from fleetlearn.export.models import BUILTIN_MODELS
    from fleetlearn.export.preprocessing import standardization

    spec = BUILTIN_MODELS[model]
    net, _ = resolve_model(model, seed=seed)
    build_bundle(net, out, model_name=model, input_shape=spec.input_shape, loss=spec.loss, optimizer=optimizer, lr=lr,
                 preprocessing=standardization(x_train), seed=seed)  # fmt: skip
    return out


def start_broker(
    url: str | None, say: Callable[[str], None] = print, port: int = 1883, embedded: bool = False
) -> tuple[str, Any]:
    """(url, handle): `url` itself and None when given; else a local broker on 127.0.0.1
    (mosquitto when installed, amqtt when not or when `embedded`), on `port` when it is free
    (MQTT's usual 1883, so `fleetlearn monitor` needs no guessing) and on any free port
    otherwise. Stop the handle with `.stop()` when done."""
    if url is not None:
        return url, None
    from fleetlearn.aggregator.broker import start_local_broker

    try:
        handle = start_local_broker("127.0.0.1", port, embedded)
    except RuntimeError:
        handle = start_local_broker("127.0.0.1", 0, embedded)
    say(f"started broker: {handle.describe()} on {handle.url}")
    return handle.url, handle


class BrokerProcess:
    """`fleetlearn broker` (mosquitto when installed, else embedded amqtt) as a child process on a free loopback port, its log
    in `log`: a broker that misbehaves stays out of the caller's process and output, and each
    run can have a fresh one. `start()` raises RuntimeError with the log's tail on failure."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        import socket

        for _ in range(3):  # a free port can be taken between the probe and the bind: retry
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "fleetlearn.cli", "broker", "--host", "127.0.0.1", "--port", str(port),
                                              "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        self.url = f"mqtt://127.0.0.1:{port}"
                        return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-2:])[:300]
        raise RuntimeError(f"the local broker did not start: {tail or 'no output'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def write_shards(work: Path, x: Any, y: Any, parts: Sequence[Any]) -> list[Path]:
    """One NPZ (x, y) per device: device i's shard holds the rows parts[i]."""
    import numpy as np

    paths = []
    for i, idx in enumerate(parts):
        path = work / f"device-{i}-data.npz"
        np.savez(path, x=x[idx], y=y[idx])
        paths.append(path)
    return paths


@dataclass(frozen=True)
class FleetSpec:
    """What one local run needs. `aggregator_args` are passed to `fleetlearn aggregator` after
    the ones this module sets (bundle, broker, fleet, rounds, devices, deadline, state, test data)."""

    bundle: Path
    work: Path  # device configs and device state dirs
    state: Path  # the aggregator's --state-dir (rounds.jsonl, checkpoints, model.onnx)
    logs: Path  # aggregator.log, device-<i>.log
    test_data: Path
    fleet: str
    rounds: int
    batch_size: int
    local_epochs: int
    seed: int  # device i shuffles with seed + i
    deadline: float = 60.0
    aggregator_args: tuple[str, ...] = ()

    def aggregator_command(self, broker_url: str, devices: int) -> list[str]:
        return [
            sys.executable, "-m", "fleetlearn.cli", "aggregator", "--bundle", str(self.bundle), "--broker", broker_url,
            "--fleet", self.fleet, "--rounds", str(self.rounds), "--min-devices", str(devices),
            "--target-devices", str(devices), "--deadline", str(self.deadline), "--state-dir", str(self.state),
            "--test-data", str(self.test_data), *self.aggregator_args,
        ]  # fmt: skip

    def device_config(self, i: int, broker_url: str, data: Path) -> Path:
        cfg = self.work / f"device-{i}.toml"
        cfg.write_text(
            f'device_id = "dev-{i}"\nfleet = "{self.fleet}"\nbroker = "{broker_url}"\nbundle = "{self.bundle}"\n'
            f'data = "{data}"\nstate_dir = "{self.work / f"device-{i}-state"}"\n\n'
            f"[training]\nbatch_size = {self.batch_size}\nlocal_epochs = {self.local_epochs}\nthreads = 1\nseed = {self.seed + i}\n"
        )
        return cfg


@dataclass
class LocalFleet:
    """The aggregator and one device process per shard, started by `start()` (or `with`), all
    terminated (then killed after 10 s) by `stop()`; each process's stderr in spec.logs."""

    spec: FleetSpec
    broker_url: str
    shards: Sequence[Path]
    aggregator: subprocess.Popen | None = None
    devices: list[subprocess.Popen] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.spec.logs / log_name, "wb")
        self._logs.append(log)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)

    def start(self) -> LocalFleet:
        spec = self.spec
        spec.logs.mkdir(parents=True, exist_ok=True)
        self.aggregator = self._spawn(spec.aggregator_command(self.broker_url, len(self.shards)), "aggregator.log")
        for i, data in enumerate(self.shards):
            cfg = spec.device_config(i, self.broker_url, data)
            cmd = [sys.executable, "-m", "fleetlearn.cli", "device", "--config", str(cfg), "--max-rounds", str(spec.rounds)]
            self.devices.append(self._spawn(cmd, f"device-{i}.log"))
        return self

    def wait(self, timeout: float) -> int | None:
        """The aggregator's exit code, or None if it is still running after `timeout` seconds."""
        assert self.aggregator is not None, "start() first"
        try:
            return self.aggregator.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def aggregator_tail(self, lines: int = 5) -> str:
        """The last lines of the aggregator's log, joined on one line (for an error message)."""
        try:
            text = (self.spec.logs / "aggregator.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])[:600]

    def failure_reason(self) -> str:
        """Why the aggregator stopped, in one line: its own `error:` line when it printed one (a
        UsageError or a failed round), else its last error event, else the tail of its log."""
        try:
            lines = (self.spec.logs / "aggregator.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        for marker in ("fleetlearn aggregator: error:", "level=error"):
            for line in reversed(lines):
                if marker in line:
                    return line.split(marker, 1)[1].strip()[:400] if marker.endswith(":") else line.strip()[:400]
        return " | ".join(lines[-3:])[:400]

    def stop(self) -> None:
        procs = [p for p in [self.aggregator, *self.devices] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalFleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def central_baseline(bundle: Path, train: Path, test: Path, *, rounds: int, local_epochs: int, batch_size: int, lr: float,
                     schedule: str = "constant", min_factor: float = 0.1, warmup: int = 0, seed: int = 0) -> tuple[str, float]:  # fmt: skip
    """The same bundle (same initial weights, optimizer, preprocessing and learning-rate schedule)
    trained on all the training data in one place for rounds x local_epochs epochs, through the
    same ONNX Runtime engine the devices use: the number federated learning should match.
    `train` and `test` are NPZ (x, y) files read as a device reads its data. Returns
    (metric name, value): ("test_mse", ...) for regression, ("test_accuracy", ...) otherwise."""
    from fleetlearn.aggregator.schedule import scheduled_lr
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.data import load_dataset
    from fleetlearn.edge_runtime.engines.trainer import Trainer

    manifest = load_bundle(bundle)
    trainer = Trainer(bundle, manifest)
    train_set, test_set = load_dataset(train, manifest), load_dataset(test, manifest)
    for epoch in range(rounds * local_epochs):
        rate = scheduled_lr(lr, epoch // local_epochs + 1, rounds, schedule, min_factor, warmup)
        trainer.train(train_set, batch_size=batch_size, epochs=1, seed=[seed, epoch], lr=rate)
    return trainer.evaluate(test_set).metric()

"""The aggregation strategy interface (after Flower's `Strategy`): a small abstract class.

A strategy decides what devices are asked to do each round and how accepted updates become
the next global model. The round engine (aggregator/server.py) owns everything else: the
protocol, validation, deadlines, acks, durability. It calls, per round:

    config = strategy.configure_round(r, w)     # RoundConfig sent in the GLOBAL frame
    strategy.begin_round(w)                     # reset the accumulator for round r
    strategy.accumulate(update)                 # once per *accepted* update, in arrival order
    ... state_dict() persisted after every accumulate, before the device's ack ...
    w_next = strategy.aggregate()               # at close (>= 1 accepted update)

and after a restart mid-round, `begin_round(w)` then `load_state_dict(saved)`.

Contract:
  * `accumulate` sees only validated updates (finite delta of the right size, samples >= 1,
    current run / model / round, one per device). A strategy that still refuses one (e.g. a
    clipping bound it cannot honour) raises `ProtocolError(reason)`; the engine then rejects
    that update with the reason, acks it as not accepted and logs it with the device id: it
    is dropped, never fatal.
  * `state_dict()` returns a dict of JSON values and numpy arrays (any depth-1 mix); the
    engine writes it atomically and gives the same dict back to `load_state_dict`. It must
    capture everything `accumulate` changed, so that "persist, crash, restart, load" yields
    the bit-identical `aggregate()` result.
  * `aggregate()` returns a new float32 vector of the model's size and must not modify the
    weights it was given.

Room for more strategies, one file each, registered in STRATEGIES below:
  * `trimmed_mean.py`, `median.py` (coordinate-wise, Byzantine-robust): NOT streaming. A
    median needs every delta at once, so their accumulator holds k * num_params floats and
    their state_dict persists all of them; memory grows with the device count. Bound it
    with target_devices.
  * `clipping.py` (norm clipping before FedAvg): streaming; clip in `accumulate`.
  * `dp_fedavg.py` (clipping + Gaussian noise on the mean): streaming; noise in `aggregate`,
    with the noise RNG seeded from persisted state so a restart reproduces the same result.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import RoundConfig, Update


class Strategy(ABC):
    """How accepted updates become the next global model."""

    name: str = "abstract"
    streaming: bool = True  # False: the accumulator holds every delta (memory ~ devices)

    @abstractmethod
    def configure_round(self, rnd: int, global_weights: np.ndarray) -> RoundConfig:
        """The training settings devices get for round `rnd` (None fields: device's own)."""

    @abstractmethod
    def begin_round(self, global_weights: np.ndarray) -> None:
        """Forget the previous round's accumulator; `global_weights` opens this round."""

    @abstractmethod
    def accumulate(self, update: Update) -> None:
        """Fold one accepted update in. May raise ProtocolError(reason) to refuse it."""

    @abstractmethod
    def aggregate(self) -> np.ndarray:
        """The next global weights (float32) from everything accumulated this round."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The partial accumulator: JSON values and numpy arrays."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `begin_round` with the same weights)."""

    def round_summary(self) -> dict[str, Any]:
        """Extra per-round fields for rounds.jsonl (e.g. samples, train_loss)."""
        return {}


# name -> "module:Class"; one file per strategy.
STRATEGIES: dict[str, str] = {
    "fedavg": "fleetlearn.aggregator.fedavg:FedAvg",
    "clipped-fedavg": "fleetlearn.aggregator.clipping:ClippedFedAvg",
    "median": "fleetlearn.aggregator.median:Median",
    "trimmed-mean": "fleetlearn.aggregator.trimmed_mean:TrimmedMean",
    "dp-fedavg": "fleetlearn.aggregator.dp_fedavg:DPFedAvg",
}
# --clip-norm / --trim-fraction / --dp-* pick and configure these: aggregator/strategy_options.py


def make_strategy(name: str, **options: Any) -> Strategy:
    """Instantiate a registered strategy; UsageError for an unknown name."""
    target = STRATEGIES.get(name)
    if target is None:
        raise UsageError(f"--strategy {name!r} is not one of: {', '.join(sorted(STRATEGIES))}")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**options)

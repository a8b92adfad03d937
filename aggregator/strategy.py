"""The strategy interface (after Flower's `serverapp/strategy/`): an aggregation rule, optionally
wrapped (clipping, DP noise), ending in a server step.

A strategy is only how accepted updates become the next global model. The engine owns the
rest: the protocol, validation, deadlines, acks, durability, and each round's training config
(aggregator/schedule.py's TrainingPlan). Per round the engine calls:

    strategy.begin_round(r, w)                    # reset the within-round accumulator
    strategy.set_sampling_rate(q)                 # with client sampling only: invited / connected
    strategy.accumulate(update)                   # once per *accepted* update, in arrival order
    ... partial_state() persisted with the accepted list before those updates are acked ...
    agg = strategy.aggregate()                    # at close (>= 1 accepted): Aggregate(total, denominator)
    w_next = strategy.step(w, agg)                # the server step: w + total/denominator for plain rules
    store.commit(r, w_next, record, accepted, server_state=strategy.state_dict())

Two kinds of state, persisted in two places:
  * within-round (`partial_state` / `load_partial_state`): the open round's accumulator (a
    running sum, or every delta for the coordinate-wise rules). Written to partial_round.bin
    before every group of acks; after a restart mid-round the engine calls `begin_round(r, w)` then
    `load_partial_state(saved)`. Reset by `begin_round`.
  * cross-round (`state_dict` / `load_state_dict`): what a server optimizer carries from round
    to round (momentum, adaptive moments). Changed only by `step`, and committed by
    ModelStore.commit in the same atomic commit as the weights `step` returned, so a SIGKILL
    never leaves weights of round r with the momentum of round r-1. Loaded once at start.
    Rules without it return {} (the default).

Contract:
  * `accumulate` sees only validated updates (finite delta of the right size, samples >= 1,
    current run / model / round, one per device). A strategy that still refuses one raises
    `ProtocolError(reason)`; the engine rejects that update with the reason (never fatal).
  * a wrapper that scales a delta (clipping) calls `inner.accumulate_scaled(update, factor)`:
    the rule folds float64(d) * factor itself; the default materializes that array and calls
    `accumulate`, the streaming rules (fedavg and the server optimizers on it) fold it in place.
  * state dicts hold JSON values and numpy arrays at depth 1; wrappers merge their keys into
    their inner strategy's (a clash is a bug and raises). "persist, crash, restart, load" must
    give the bit-identical `aggregate()` and `step()`.
  * `aggregate()` is pure (calling it twice gives the same result); `step()` returns a new
    float32 vector and never modifies the weights it was given.

Adding a strategy: one file with the rule (or server optimizer) and its Options, and one line
in aggregator/registry.py (docs/aggregator.md, "Adding a strategy").
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fleetlearn.aggregator.options import Options
from fleetlearn.edge_runtime.core.protocol import Update


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregated update as a fraction, Delta = total / denominator (float64 (P,)).

    Kept as a fraction so a wrapper can act on the sum before the division: DP noise is added
    to the clipped sum, then divided by the fixed expected participant count (dp_fedavg.py)."""

    total: np.ndarray
    denominator: float

    def delta(self) -> np.ndarray:
        """Delta = total / denominator, float64."""
        if not self.denominator > 0:
            raise ValueError(f"aggregate denominator must be > 0, got {self.denominator}")
        return self.total / float(self.denominator)


def apply_delta(weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """w' = w + Delta, in float64, rounded once to float32 (a new array)."""
    return (np.asarray(weights, dtype=np.float64) + delta).astype(np.float32)


@dataclass(frozen=True)
class NoOptions(Options):
    """A rule with nothing to configure."""


class Strategy(ABC):
    """How accepted updates become the next global model."""

    name: ClassVar[str] = "abstract"
    Options: ClassVar[type[Options]] = NoOptions
    options: Any  # an instance of the class's own Options (its fields are the subclass's)

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # ------------------------------------------------------------ within a round

    @abstractmethod
    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        """Forget the previous round's accumulator; `global_weights` opens this round."""

    @abstractmethod
    def accumulate(self, update: Update) -> None:
        """Fold one accepted update in. May raise ProtocolError(reason) to refuse it."""

    def accumulate_scaled(self, update: Update, factor: float) -> None:
        """Fold in the update with its delta scaled by `factor` (a wrapper's, e.g. clipping's
        min(1, C/||d||)): the delta handed on is float64(d) * factor (d itself when factor is 1).
        Streaming rules override this to fold the scaled delta without materializing it."""
        d = np.asarray(update.delta, dtype=np.float64)
        self.accumulate(dataclasses.replace(update, delta=d * factor if factor != 1.0 else d.copy()))

    @abstractmethod
    def aggregate(self) -> Aggregate:
        """The round's aggregated update from everything accumulated (>= 1 update)."""

    @abstractmethod
    def partial_state(self) -> dict[str, Any]:
        """The within-round accumulator: JSON values and numpy arrays."""

    @abstractmethod
    def load_partial_state(self, state: dict[str, Any]) -> None:
        """Restore what `partial_state` returned (after `begin_round` with the same weights)."""

    def round_summary(self) -> dict[str, Any]:
        """Extra per-round fields for rounds.jsonl (e.g. samples, train_loss)."""
        return {}

    def set_sampling_rate(self, q: float) -> None:  # noqa: B027  (an optional hook: most strategies ignore it)
        """This round's client-sampling rate q = invited / connected (aggregator/sampling.py),
        told by the engine after begin_round when it samples devices. Only DP accounting uses it."""

    # ------------------------------------------------------------ across rounds

    def step(self, weights: np.ndarray, agg: Aggregate) -> np.ndarray:
        """The server step: the next global weights (float32). Plain rules: w + Delta."""
        return apply_delta(weights, agg.delta())

    def state_dict(self) -> dict[str, Any]:
        """Cross-round state (server optimizer moments); {} for a rule without any."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned at the last commit ({} for a fresh run)."""
        if state:
            raise ValueError(
                f"the state dir holds server-optimizer state ({', '.join(sorted(state))}) that --strategy {self.name} does not keep"
            )

    @property
    def rule(self) -> Strategy:
        """The aggregation rule at the core (wrappers return their inner strategy's)."""
        return self


class Wrapper(Strategy):
    """A strategy around another one (clipping, DP noise): by default every call is the inner
    strategy's; a wrapper overrides what it changes and merges its state keys into the inner's."""

    prefix: ClassVar[str] = ""  # the composition is named f"{prefix}-{inner.name}"

    def __init__(self, inner: Strategy):
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.prefix}-{self.inner.name}"

    @property
    def rule(self) -> Strategy:
        return self.inner.rule

    def begin_round(self, rnd: int, global_weights: np.ndarray) -> None:
        self.inner.begin_round(rnd, global_weights)

    def accumulate(self, update: Update) -> None:
        self.inner.accumulate(update)

    def aggregate(self) -> Aggregate:
        return self.inner.aggregate()

    def own_partial_state(self) -> dict[str, Any]:
        return {}

    def load_own_partial_state(self, state: dict[str, Any]) -> None:
        pass

    def partial_state(self) -> dict[str, Any]:
        return merge_states(self.inner.partial_state(), self.own_partial_state())

    def load_partial_state(self, state: dict[str, Any]) -> None:
        own = self.own_partial_state().keys()
        self.load_own_partial_state({k: v for k, v in state.items() if k in own})
        self.inner.load_partial_state({k: v for k, v in state.items() if k not in own})

    def round_summary(self) -> dict[str, Any]:
        return self.inner.round_summary()

    def set_sampling_rate(self, q: float) -> None:
        self.inner.set_sampling_rate(q)

    def step(self, weights: np.ndarray, agg: Aggregate) -> np.ndarray:
        return self.inner.step(weights, agg)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def merge_states(inner: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    clash = set(inner) & set(own)
    if clash:
        raise ValueError(f"state keys {sorted(clash)} are used by a wrapper and its inner strategy")
    return {**inner, **own}

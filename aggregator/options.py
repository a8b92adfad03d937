"""Options of strategies and wrappers: a frozen dataclass per component that checks itself and
renders its own command-line flags.

    @dataclass(frozen=True)
    class TrimmedMeanOptions(Options):
        trim_fraction: float = option(0.1, "--trim-fraction", float, "drop ... per coordinate",
                                      metavar="BETA", check=lambda b: 0 <= b < 0.5, bound="in [0, 0.5)")

Each field's metadata is its flag: the type argparse converts with, the help text, and the
bound, checked once, in `__post_init__`, as a one-line UsageError naming the flag
("--trim-fraction must be in [0, 0.5), got 0.5"). The field name is the argparse `dest` and the
key in the aggregator config's `StrategyChoice.options`; two components may declare the same
field only with the same flag (e.g. a `--server-lr` shared by several server optimizers).
Flags are added with `default=argparse.SUPPRESS`, so the namespace holds exactly the options
the operator gave: that is how "this option does not belong to that strategy" is caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetlearn.edge_runtime.core.errors import UsageError


@dataclass(frozen=True)
class Flag:
    flag: str  # "--trim-fraction"
    type: Callable[[str], Any]  # what argparse converts the text with
    help: str
    metavar: str | None = None
    check: Callable[[Any], bool] | None = None  # True when the value is acceptable
    bound: str = ""  # what `check` demands, for the error: "in [0, 0.5)"
    choices: tuple[str, ...] | None = None


def option(
    default: Any,
    flag: str,
    type: Callable[[str], Any],
    help: str,
    *,
    metavar: str | None = None,
    check: Callable[[Any], bool] | None = None,
    bound: str = "",
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"flag": Flag(flag, type, help, metavar, check, bound, choices)})


def finite_positive(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class Options:
    """Base of every strategy's and wrapper's options. Subclasses are frozen dataclasses whose
    fields are all declared with `option(...)`."""

    def __post_init__(self) -> None:
        for name, f in self.flags().items():
            value = getattr(self, name)
            if value is None:
                continue
            if f.choices is not None and value not in f.choices:
                raise UsageError(f"{f.flag} must be one of {', '.join(f.choices)}, got {value!r}")
            if f.check is not None and not f.check(value):
                raise UsageError(f"{f.flag} must be {f.bound}, got {value}")

    @classmethod
    def flags(cls) -> dict[str, Flag]:
        """field name -> its flag, in declaration order."""
        return {f.name: f.metadata["flag"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]):
        """The options from the values given (by field name; others keep their defaults)."""
        return cls(**{k: v for k, v in values.items() if k in cls.flags()})

    @classmethod
    def add_arguments(cls, group: Any, seen: set[str]) -> None:
        """Add this component's flags to an argparse group (a flag already in `seen` is skipped)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, flag in cls.flags().items():
            if flag.flag in seen:
                continue
            seen.add(flag.flag)
            default = defaults[name]
            shown = "" if default is None else f" (default {default})"
            kwargs: dict[str, Any] = {"dest": name, "type": flag.type, "default": argparse.SUPPRESS, "help": flag.help + shown}
            if flag.metavar:
                kwargs["metavar"] = flag.metavar
            if flag.choices:
                kwargs["choices"] = list(flag.choices)
            group.add_argument(flag.flag, **kwargs)


def add_arguments_for(group: Any, classes: Iterable[type[Options]], owners: Mapping[type[Options], str] | None = None) -> None:
    """Add every flag of `classes` to an argparse group once. A flag several components declare
    with different defaults (--server-lr: 1 for fedavgm, 0.01 for the adaptive optimizers) shows
    each default with its owners' names from `owners` (options class -> "fedadam/fedyogi")."""
    classes = list(classes)
    defaults: dict[str, list[tuple[Any, str]]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            defaults.setdefault(f.metadata["flag"].flag, []).append((f.default, (owners or {}).get(cls, cls.__name__)))
    seen: set[str] = set()
    for cls in classes:
        own = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, flag in cls.flags().items():
            if flag.flag in seen:
                continue
            seen.add(flag.flag)
            values = defaults[flag.flag]
            if len({repr(d) for d, _ in values}) > 1:
                by_default: dict[str, list[str]] = {}
                for d, who in values:
                    by_default.setdefault(repr(d), []).append(who)
                shown = " (default " + "; ".join(f"{'/'.join(w)}: {d}" for d, w in by_default.items()) + ")"
            else:
                shown = "" if own[name] is None else f" (default {own[name]})"
            kwargs: dict[str, Any] = {"dest": name, "type": flag.type, "default": argparse.SUPPRESS, "help": flag.help + shown}
            if flag.metavar:
                kwargs["metavar"] = flag.metavar
            if flag.choices:
                kwargs["choices"] = list(flag.choices)
            group.add_argument(flag.flag, **kwargs)


def flag_names(option_classes: Iterable[type[Options]], names: Iterable[str] | None = None) -> list[str]:
    """The flags of these options classes (restricted to the field `names`, when given)."""
    out: list[str] = []
    for cls in option_classes:
        for name, f in cls.flags().items():
            if (names is None or name in names) and f.flag not in out:
                out.append(f.flag)
    return out

"""Turn `--model NAME_OR_IMPORT_PATH` into an `nn.Module` plus the defaults that come with it."""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetlearn.export.errors import UsageError
from fleetlearn.export.models import BUILTIN_MODELS, BuiltinModel

if TYPE_CHECKING:
    from torch import nn

# package.module:factory  (the attribute part may be dotted, e.g. `pkg.mod:Builder.create`)
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class ModelDefaults:
    """What we know about a model besides its module. `None` means "the caller must say"."""

    name: str
    input_shape: tuple[int, ...] | None = None
    task: str | None = None
    loss: str | None = None
    builtin: bool = False


def resolve_model(name_or_import_path: str, *, seed: int | None = None) -> tuple[nn.Module, ModelDefaults]:
    """Build the model named by a built-in name (`boston-mlp`) or an import path (`pkg.mod:factory`).

    `seed`, when given, seeds torch's RNG right before the factory runs, so the initial weights
    (and therefore the bundle) are reproducible. The factory is called with no arguments and must
    return an `nn.Module`. For import paths the current directory is put on `sys.path` (as
    `python -m` would), so a console-script run finds the user's own modules.

    Raises `UsageError` (one line) when the name does not resolve or the factory misbehaves.
    """
    import torch

    spec = name_or_import_path.strip()
    builtin = check_model_spec(spec)
    if builtin is not None:
        factory, defaults = (
            builtin.factory,
            ModelDefaults(builtin.name, builtin.input_shape, builtin.task, builtin.loss, builtin=True),
        )
    else:
        factory = _import_factory(spec)
        defaults = ModelDefaults(default_name(spec))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as exc:  # the user's code: report it, don't crash with a traceback
        raise UsageError(f"model factory {spec!r} raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model, defaults


def check_model_spec(spec: str) -> BuiltinModel | None:
    """The built-in model named `spec`, or None for a well-formed import path; UsageError otherwise.

    Imports nothing, so the CLI can reject a typo before loading torch.
    """
    builtin = BUILTIN_MODELS.get(spec)
    if builtin is not None:
        return builtin
    if ":" not in spec:
        names = ", ".join(BUILTIN_MODELS)
        raise UsageError(f"unknown model {spec!r}: not a built-in ({names}) and not an import path 'package.module:factory'")
    if not _IMPORT_PATH.match(spec):
        raise UsageError(f"malformed import path {spec!r}: expected 'package.module:factory'")
    return None


def default_name(spec: str) -> str:
    """model_name for an import path: the factory's name (`pkg.nets:build_net` -> `build_net`)."""
    return spec.rpartition(":")[2].rpartition(".")[2]


def _import_factory(spec: str):
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise UsageError(f"cannot import {module_name!r} for model {spec!r}: no module named {missing!r}") from exc
        raise UsageError(f"importing {module_name!r} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    target = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr_path!r} (model {spec!r})") from None
    if not callable(target):
        raise UsageError(f"{spec!r} is a {type(target).__name__}, not a callable that returns an nn.Module")
    return target


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")

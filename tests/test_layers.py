"""The package's layers, checked on the source: who may import whom.

fleetlearn is one importable package whose subpackages are the architecture's rooms:

    fleetlearn.edge_runtime   ground floor: stdlib, numpy, onnxruntime, paho-mqtt (+ cryptography)
    fleetlearn.export         -> edge_runtime (+ torch, onnx)
    fleetlearn.provisioning   -> edge_runtime (broker config, credentials layout, PKI)
    fleetlearn.aggregator     -> edge_runtime, provisioning (the credentials layout)
    fleetlearn.firmware_configs -> edge_runtime, provisioning (flash --credentials)
    fleetlearn (cli, demo, monitor, report): the CLI layer, on top of all of them

An import that breaks these rules fails here with the file and line, before it can reach a
device that has no torch (tests/test_edge_venv.py proves the same at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the package it installs as.
FOLDERS = {
    "edge_runtime": "fleetlearn.edge_runtime",
    "aggregator": "fleetlearn.aggregator",
    "export": "fleetlearn.export",
    "firmware_configs": "fleetlearn.firmware_configs",
    "provisioning": "fleetlearn.provisioning",
}
CLI_LAYER = {p.stem for p in (ROOT / "fleetlearn").glob("*.py") if p.stem != "__init__"}
DEVICE_THIRD_PARTY = {"numpy", "onnxruntime", "paho", "cryptography"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name `path` imports, with its line (relative imports are not used here)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (use the full fleetlearn.* name)"
            base = node.module or ""
            # `from fleetlearn.x import y` may import the module fleetlearn.x.y: count both names.
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_edge_runtime_imports_only_the_device_stack():
    stdlib = __import__("sys").stdlib_module_names
    bad = []
    for path in _sources("edge_runtime"):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if name.startswith("fleetlearn."):
                ok = name.startswith("fleetlearn.edge_runtime")
            else:
                ok = top in stdlib or top in DEVICE_THIRD_PARTY or top == "fleetlearn"
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "edge_runtime must stay torch-free and import no other fleetlearn package:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["edge_runtime", "aggregator", "export", "firmware_configs", "provisioning"])
def test_no_package_imports_upward_into_the_cli_layer(folder):
    upward = {f"fleetlearn.{m}" for m in CLI_LAYER}
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in _sources(folder)
        for line, name in _imports(p)
        if any(name == u or name.startswith(u + ".") for u in upward)
    ]
    assert not bad, "the CLI layer sits on top; nothing below may import it:\n" + "\n".join(bad)


def test_provisioning_imports_only_the_ground_floor():
    """The operator's provisioning tool stands on edge_runtime alone: the aggregator, flash and
    the CLI layer may use it (the credentials layout), never the other way round."""
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in _sources("provisioning")
        for line, name in _imports(p)
        if name.startswith("fleetlearn.") and not name.startswith(("fleetlearn.edge_runtime", "fleetlearn.provisioning"))
    ]
    assert not bad, "provisioning may import fleetlearn.edge_runtime only:\n" + "\n".join(bad)


def test_the_aggregator_engine_never_exports_a_model():
    """Exporting on start (--model) is the aggregator's CLI module's job: the engine is given a
    bundle dir, so it runs where torch is not installed."""
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in _sources("aggregator")
        if p.name != "cli.py"
        for line, name in _imports(p)
        if name == "fleetlearn.export" or name.startswith("fleetlearn.export.") or name.split(".")[0] in ("torch", "onnx")
    ]
    assert not bad, "\n".join(bad)


def test_no_module_over_450_lines():
    """Small modules with one job: nothing outside tests passes 450 lines."""
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for folder in [*FOLDERS, "fleetlearn", "bench"]
        for p in _sources(folder)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450
    ]
    assert not long, "\n".join(long)


def test_no_module_uses_the_old_top_level_names():
    """`import export` / `import aggregator` would pick up a user's own export.py: only fleetlearn.* exists."""
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for folder in [*FOLDERS, "fleetlearn", "tests", "bench"]
        for p in _sources(folder)
        for line, name in _imports(p)
        if name.split(".")[0] in FOLDERS
    ]
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed():
    """pyproject's explicit package list names every folder that holds an __init__.py."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(meta["packages"])
    found = {"fleetlearn"}
    for folder, package in FOLDERS.items():
        assert meta["package-dir"][package] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert listed == found, f"pyproject packages {sorted(listed ^ found)} differ from the tree"


@pytest.mark.slow
def test_built_wheel_installs_one_top_level_package(tmp_path):
    """The wheel flash builds (the same one `pip install .` makes) holds `fleetlearn` and nothing beside it."""
    import zipfile

    from fleetlearn.firmware_configs.wheels import build_project_wheel

    wheel = build_project_wheel(ROOT, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["fleetlearn"]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fleetlearn"}
    for module in (
        "fleetlearn/edge_runtime/core/protocol/__init__.py",
        "fleetlearn/export/build.py",
        "fleetlearn/aggregator/cli.py",
        "fleetlearn/firmware_configs/profiles/raspberry-pi-4.toml",
    ):
        assert module in names, module


def test_cli_layer_modules_import_each_other_without_cycles():
    """fleetlearn/*.py (demo, demo_dp, monitor, report, experiment...) form a DAG: a module that
    needs a function of a module that imports it takes it as an argument instead."""
    graph = {
        m: {
            name.split(".")[1]
            for _, name in _imports(ROOT / "fleetlearn" / f"{m}.py")
            if name.startswith("fleetlearn.") and name.split(".")[1] in CLI_LAYER and name.split(".")[1] != m
        }
        for m in CLI_LAYER
    }
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, "import cycle: " + " -> ".join((*path, m))
        if m not in done:
            for n in sorted(graph[m]):
                visit(n, (*path, m))
            done.add(m)

    for m in sorted(graph):
        visit(m, ())

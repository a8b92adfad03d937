"""Bad input to `fleetlearn export`, through the real CLI in subprocesses.

Each case must exit with code 2, print exactly one line on stderr that names the problem, and
leave no bundle (and no staging directory) behind. The subprocesses run concurrently: each pays
for importing torch, and together they would otherwise dominate the suite's runtime.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FIX = "tests.export_fixtures"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line (case-insensitive)
    setup: str = ""  # "" | "empty_dir" | "foreign_dir" | "bundle"


CASES: dict[str, Case] = {
    "unknown_builtin": Case(("--model", "bostn-mlp"), ("unknown model", "bostn-mlp")),
    "import_path_module_missing": Case(
        ("--model", "tests.no_such_module:build", "--input-shape", "4", "--loss", "mse"),
        ("cannot import", "tests.no_such_module"),
    ),
    "import_path_attr_missing": Case(
        ("--model", f"{FIX}:no_such_factory", "--input-shape", "4", "--loss", "mse"), ("no attribute", "no_such_factory")
    ),
    "factory_returns_int": Case(
        ("--model", f"{FIX}:returns_int", "--input-shape", "4", "--loss", "mse"), ("returned int", "not a torch.nn.module")
    ),
    "factory_raises": Case(
        ("--model", f"{FIX}:raises", "--input-shape", "4", "--loss", "mse"), ("raised runtimeerror", "on purpose")
    ),
    "no_trainable_params": Case(
        ("--model", f"{FIX}:no_params", "--input-shape", "4", "--loss", "mse"), ("no trainable parameters",)
    ),
    "untrainable_op": Case(
        ("--model", f"{FIX}:untrainable_op", "--input-shape", "4", "--loss", "mse"), ("cannot train through op round",)
    ),
    "unexportable_op": Case(
        ("--model", f"{FIX}:unexportable_op", "--input-shape", "4", "--loss", "mse"), ("cannot export", "sinh")
    ),
    "op_without_gradient_groupnorm": Case(
        ("--model", f"{FIX}:groupnorm_cnn", "--input-shape", "1,8,8", "--loss", "cross_entropy"),
        ("cannot train through op instancenormalization",),
    ),
    "loss_does_not_fit_output": Case(("--model", "boston-mlp", "--loss", "cross_entropy"), ("cross_entropy", "(batch, 1)")),
    "wrong_input_shape": Case(("--model", "digits-cnn", "--input-shape", "64"), ("forward() failed", "input-shape")),
    "sgd_weight_decay": Case(
        ("--model", "boston-mlp", "--optimizer", "sgd", "--weight-decay", "0.1"), ("sgd weight decay", "adamw")
    ),
    "missing_input_shape": Case(("--model", f"{FIX}:binary_mlp", "--loss", "mse"), ("--input-shape is required",)),
    "bad_standardize_file": Case(("--model", "boston-mlp", "--standardize-from", "data/README.md"), (".npz or .csv",)),
    "out_exists": Case(("--model", "boston-mlp"), ("already exists", "--force"), setup="empty_dir"),
    "force_on_foreign_dir": Case(("--model", "boston-mlp", "--force"), ("not a bundle", "refusing"), setup="foreign_dir"),
    "force_keeps_old_bundle_on_failure": Case(
        ("--model", f"{FIX}:untrainable_op", "--input-shape", "4", "--loss", "mse", "--force"),
        ("cannot train through op round",),
        setup="bundle",
    ),
}


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory):
    from fleetlearn.export import build_bundle, resolve_model

    model, d = resolve_model("boston-mlp", seed=0)
    out = tmp_path_factory.mktemp("ref") / "bundle"
    build_bundle(model, out, model_name=d.name, input_shape=d.input_shape, loss=d.loss)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, reference_bundle):
    """Run every case at once; returns name -> (CompletedProcess, out_dir)."""
    base = tmp_path_factory.mktemp("cli_errors")

    def run(name: str, case: Case):
        parent = base / name
        parent.mkdir()
        out = parent / "bundle"
        if case.setup == "empty_dir":
            out.mkdir()
        elif case.setup == "foreign_dir":
            out.mkdir()
            (out / "thesis.tex").write_text("precious")
        elif case.setup == "bundle":
            shutil.copytree(reference_bundle, out)
        cmd = [PY, "-m", "fleetlearn.cli", "export", *case.args, "--out", str(out)]
        return name, (subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300), out)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(lambda item: run(*item), CASES.items()))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(results, name, reference_bundle):
    case = CASES[name]
    proc, out = results[name]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # one line: no traceback, no ORT/torch log noise
    line = lines[0].lower()
    assert line.startswith("fleetlearn export: error: "), line
    for word in case.expect:
        assert word.lower() in line, (word, line)
    assert proc.stdout == ""
    siblings = sorted(p.name for p in out.parent.iterdir())
    if case.setup == "":
        assert siblings == [], siblings  # no bundle, no staging directory
    else:
        assert siblings == ["bundle"], siblings  # what was there is untouched
        if case.setup == "foreign_dir":
            assert (out / "thesis.tex").read_text() == "precious"
        if case.setup == "bundle":
            assert load_bundle(out).model_hash == load_bundle(reference_bundle).model_hash


def test_help_explains_every_flag():
    r = subprocess.run([PY, "-m", "fleetlearn.cli", "export", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0
    for flag in ("--model", "--out", "--input-shape", "--loss", "--optimizer", "--lr", "--weight-decay", "--betas",
                 "--eps", "--momentum", "--standardize-from", "--seed", "--force", "--name"):  # fmt: skip
        assert flag in r.stdout
    assert "boston-mlp" in r.stdout and "digits-cnn" in r.stdout


def test_help_does_not_import_torch():
    code = ("import sys; from fleetlearn.cli import main; import argparse, fleetlearn.export.cli as c; "
            "p = argparse.ArgumentParser(); c.add_arguments(p); "
            "assert not [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules], sorted(sys.modules)")  # fmt: skip
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

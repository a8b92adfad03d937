"""Bad grid files are one-line errors, exit 2, before anything runs; the statistics behind the tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetlearn.cli import main
from fleetlearn.experiment_results import rounds_to_target, t_critical_975, t_interval
from tests.conftest import DATA, ROOT

GOOD = """
model = "boston-mlp"
devices = 2
rounds = 3
lr = 0.003
seeds = [0, 1]
partitions = ["iid", "quantity:0.5"]
target = 40.0

[[strategies]]
name = "fedavg"

[[strategies]]
name = "trimmed-mean"
args = ["--trim-fraction", "0.2"]
"""


def _run(tmp_path, text: str, *extra: str, capsys, out: str = "out") -> tuple[int, str, str]:
    config = tmp_path / "grid.toml"
    config.write_text(text)
    code = main(["experiment", "--config", str(config), "--out", str(tmp_path / out), *extra])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def test_a_good_grid_passes_check_without_running_anything(tmp_path, capsys):
    code, err, out = _run(tmp_path, GOOD, "--check", capsys=capsys)
    assert code == 0 and err == ""
    assert "ok (8 runs: 2 strategies x 2 partitions x 2 seeds)" in out
    assert not (tmp_path / "out").exists()


def test_the_committed_grids_are_valid(capsys):
    grids = sorted((ROOT / "experiments").glob("*.toml"))
    assert {g.name for g in grids} >= {"boston.toml", "digits.toml"}
    for grid in grids:
        assert main(["experiment", "--config", str(grid), "--out", "/nonexistent", "--check"]) == 0, capsys.readouterr().err


BAD = [
    ("rounds = 3\n", "round = 3\n", "unknown key 'round'"),
    ('model = "boston-mlp"', 'model = "resnet"', "model must be one of"),
    ("devices = 2", "devices = 0", "devices must be an integer in [1, 1000]"),
    ("devices = 2", 'devices = "two"', "devices must be an integer"),
    ("devices = 2", "devices = 500", "cannot give 500 devices at least one sample"),
    ("lr = 0.003", 'lr = "fast"', "lr must be a number in (0, 10]"),
    ("lr = 0.003", "lr = 0", "lr must be a number"),
    ("lr = 0.003\n", "", "lr is required"),
    ("seeds = [0, 1]", "seeds = []", "seeds must be a non-empty list"),
    ("seeds = [0, 1]", "seeds = [1, 1]", "seeds must be distinct integers"),
    ('partitions = ["iid", "quantity:0.5"]', 'partitions = ["iid", "dirichlet:x"]', "alpha must be a number"),
    ('partitions = ["iid", "quantity:0.5"]', 'partitions = ["iid", "IID"]', "iid is listed twice"),
    ('partitions = ["iid", "quantity:0.5"]', 'partitions = ["shards:300"]', "needs at least 600 samples"),
    ("target = 40.0\n", "", "target must be a number"),
    ("target = 40.0", 'target = 40.0\nmetric = "test_accuracy"', "metric must be one of test_loss, test_mse"),
    ('[[strategies]]\nname = "fedavg"\n', '[[strategies]]\nname = "fedavg"\nlr = 1\n', "strategies[0]: unknown key 'lr'"),
    ('name = "fedavg"', 'name = "fedsgd"', "--strategy 'fedsgd' is not one of"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--no-such-flag", "0.1"]', "unrecognized arguments: --no-such-flag 0.1"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--server-lr", "0.1"]', "--server-lr"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--rounds", "5"]', "args set --rounds, which the grid controls"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--lr", "1"]', "args set --lr, which the grid controls"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--strategy", "median"]', "args set --strategy"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = ["--help"]', "unrecognized arguments: --help"),
    ('name = "fedavg"', 'name = "fedavg"\nargs = "--clip-norm 1"', "args must be a list of strings"),
    ('"--trim-fraction", "0.2"', '"--trim-fraction", "0.7"', "--trim-fraction must be in [0, 0.5)"),
    ('name = "trimmed-mean"', 'name = "fedavg"', "label 'fedavg' is used twice"),
    ('model = "boston-mlp"', 'model = "boston-mlp"\ndata = "nowhere.npz"', "nowhere.npz: data split not found"),
    ('model = "boston-mlp"', 'model = "boston-mlp"\ndata = "digits"', "has 64 features per sample, boston-mlp takes 13"),
    ("rounds = 3", "rounds = 3\nlr_warmup = 3", "lr_warmup must be below rounds"),
    ("rounds = 3", "rounds = [", "not valid TOML"),
    ("rounds = 3", "rounds = 3\nvalidation = 0.6", "validation must be a number in [0, 0.5]"),
    ("rounds = 3", 'rounds = 3\nvalidation = "yes"', "validation must be a number"),
]


@pytest.mark.parametrize("old, new, fragment", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_grids_are_one_line_errors_with_exit_2(tmp_path, capsys, old, new, fragment):
    assert old in GOOD
    code, err, _ = _run(tmp_path, GOOD.replace(old, new, 1), capsys=capsys)
    assert code == 2
    assert fragment in err, err
    assert err.startswith("fleetlearn experiment: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists(), "nothing may run (or be written) for a bad grid"


def test_a_missing_grid_and_a_used_out_dir_are_errors(tmp_path, capsys):
    assert main(["experiment", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.csv").write_text("x")
    code, err, _ = _run(tmp_path, GOOD, capsys=capsys, out="used")
    assert code == 2 and "is not an empty directory" in err
    assert (used / "results.csv").read_text() == "x"


def test_t_critical_values_are_the_student_t_quantiles():
    stats = pytest.importorskip("scipy.stats", reason="scipy (a scikit-learn dependency, dev extra) checks the table")
    for df in range(1, 31):
        assert t_critical_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-8)
    for df in (31, 35, 45, 59, 61, 100, 500, 10_000):
        assert t_critical_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_t_interval_matches_scipy_and_degenerates_honestly():
    stats = pytest.importorskip("scipy.stats", reason="scipy checks the interval")
    values = [23.1, 25.7, 24.2, 30.0, 22.8]
    got = t_interval(values)
    sem = np.std(values, ddof=1) / math.sqrt(len(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
    assert (got.n, got.mean) == (5, pytest.approx(np.mean(values))) and (got.low, got.high) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    one = t_interval([3.0])
    assert (one.mean, one.low, one.high) == (3.0, None, None)
    assert t_interval([]).mean is None


def test_rounds_to_target_follows_the_metric_direction():
    series = [(1, 80.0), (2, 41.0), (3, 39.0), (4, 45.0)]
    assert rounds_to_target(series, 40.0, higher_is_better=False) == 3
    assert rounds_to_target(series, 90.0, higher_is_better=True) is None
    assert rounds_to_target([(1, 0.5), (2, 0.91), (3, 0.95)], 0.9, higher_is_better=True) == 2


def test_the_digits_split_is_scikit_learns_digits_split_as_documented():
    """data/README.md's recipe, re-run: the committed file is exactly that (values, dtypes, order)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (dev extra) re-derives the split")
    d = datasets.load_digits()
    idx = np.random.default_rng(0).permutation(len(d.data))
    te, tr = idx[:360], idx[360:]
    with np.load(DATA / "digits_split.npz", allow_pickle=False) as f:
        assert f["x_train"].dtype == np.uint8 and f["y_train"].dtype == np.int64
        assert np.array_equal(f["x_train"], d.data[tr]) and np.array_equal(f["y_train"], d.target[tr])
        assert np.array_equal(f["x_test"], d.data[te]) and np.array_equal(f["y_test"], d.target[te])


def test_a_validation_grid_evaluates_on_held_out_training_rows_and_never_reads_the_test_split(tmp_path):
    """Tuning grids (validation = F) must not see the test split: the evaluated rows are a
    seeded, label-stratified F of the training rows, disjoint from the rows the devices train on."""
    from fleetlearn.experiment import _load_data
    from fleetlearn.experiment_config import load_grid

    config = tmp_path / "grid.toml"
    config.write_text(
        GOOD.replace('model = "boston-mlp"', 'model = "digits-mlp"').replace("target = 40.0", "target = 0.9\nvalidation = 0.2")
    )
    grid = load_grid(config)
    assert grid.validation == 0.2
    with np.load(DATA / "digits_split.npz") as d:
        x, y, x_test = d["x_train"].astype(np.float64), d["y_train"], d["x_test"].astype(np.float64)
    split = _load_data(grid)
    assert len(split.y_train) + len(split.y_test) == len(y)
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    train_rows = {rows[r.tobytes()] for r in split.x_train}
    val_rows = {rows[r.tobytes()] for r in split.x_test}
    assert not train_rows & val_rows and len(train_rows | val_rows) == len(y), "every training row lands in exactly one side"
    assert not {r.tobytes() for r in x_test} & {r.tobytes() for r in split.x_test}, "a test row leaked into the validation set"
    for c in range(10):  # stratified: every class keeps ~20% of its rows
        n_c = int((y == c).sum())
        assert int((split.y_test == c).sum()) == round(0.2 * n_c)
    assert np.array_equal(_load_data(grid).x_test, split.x_test), "the hold-out is deterministic"
    assert np.array_equal(y[sorted(val_rows)], split.y_test), "labels travel with their rows"

"""Fast checks of export's pieces: optimizer mapping, preprocessing, shapes, hashing, the Python API."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from fleetlearn.edge_runtime.core.errors import DataError, UsageError
from fleetlearn.export import OptimizerConfig, build_bundle, resolve_model
from fleetlearn.export.build import parse_shape
from fleetlearn.export.manifest import compute_model_hash
from fleetlearn.export.preprocessing import standardization_from_file, validate_preprocessing

# ---------------------------------------------------------------- optimizers


def test_defaults_are_torchs():
    p = [torch.nn.Parameter(torch.zeros(1))]
    adamw = OptimizerConfig.create("adamw")
    d = torch.optim.AdamW(p).defaults
    assert (adamw.lr, adamw.betas, adamw.eps, adamw.weight_decay) == (d["lr"], d["betas"], d["eps"], d["weight_decay"])
    sgd = OptimizerConfig.create("sgd")
    d = torch.optim.SGD(p).defaults
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (d["lr"], d["momentum"], d["weight_decay"])


def test_kernel_mapping():
    k = OptimizerConfig.create("adamw", lr=0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2).kernel()
    assert k.op_type == "AdamWOptimizer"
    assert k.attributes == {"alpha": 0.8, "beta": 0.99, "epsilon": 1e-6, "weight_decay": 0.2, "correct_bias": 1,
                            "adam_mode": 0}  # fmt: skip
    assert OptimizerConfig.create("sgd").kernel().op_type == "SGDOptimizerV2"
    k = OptimizerConfig.create("sgd", momentum=0.9).kernel()
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    assert k.op_type == "AdamWOptimizer" and k.attributes["adam_mode"] == 1 and k.attributes["correct_bias"] == 0
    assert k.attributes["beta"] == 1.0 and k.attributes["epsilon"] == f32(1.0) - f32(0.9)


@pytest.mark.parametrize("name,kwargs,words", [
    ("sgd", dict(weight_decay=0.1), "sgd weight decay"),
    ("sgd", dict(momentum=0.9, weight_decay=0.1), "sgd weight decay"),
    ("sgd", dict(betas=(0.9, 0.9)), "betas apply to adamw"),
    ("sgd", dict(momentum=1.0), "momentum must be in [0, 1)"),
    ("adamw", dict(momentum=0.9), "momentum applies to sgd"),
    ("adamw", dict(lr=0), "learning rate must be"),
    ("adamw", dict(betas=(0.9, 1.0)), "beta2 must be in [0, 1)"),
    ("adamw", dict(eps=float("nan")), "eps must be"),
    ("adam", {}, "unknown optimizer"),
])  # fmt: skip
def test_optimizer_refusals(name, kwargs, words):
    with pytest.raises(UsageError, match=None) as e:
        OptimizerConfig.create(name, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- preprocessing and shapes


def test_standardize_from_npz_prefers_training_split(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    x[:, 2] = 5.0  # a constant feature gets std 1, not 0
    p = tmp_path / "d.npz"
    np.savez(p, x=np.full((2, 3), 99.0), x_train=x, y_train=np.zeros(4))
    pre = standardization_from_file(p, (3,))
    np.testing.assert_allclose(pre["mean"], x.mean(0))
    np.testing.assert_allclose(pre["std"], [x[:, 0].std(), x[:, 1].std(), 1.0])


def test_standardize_from_csv_drops_the_target_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,target\n1,10,0\n3,30,1\n")
    assert standardization_from_file(p, (2,)) == {"mean": [2.0, 20.0], "std": [1.0, 10.0]}
    # images: one value per input element
    np.savez(tmp_path / "img.npz", x=np.random.default_rng(0).random((5, 1, 2, 2)), y=np.zeros(5))
    assert len(standardization_from_file(tmp_path / "img.npz", (1, 2, 2))["mean"]) == 4


@pytest.mark.parametrize("content,words", [
    ("a,b,t\n1,2\n", "row 2 has 2 columns"),
    ("a,b,t\n1,x,3\n", "non-numeric"),
    ("a,b,t\n", "at least one data row"),
    ("a,b,t\n1,nan,3\n", "NaN"),
    ("a,b,c,t\n1,2,3,4\n", "3 features per sample"),
])  # fmt: skip
def test_standardize_refusals(tmp_path, content, words):
    p = tmp_path / "d.csv"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        standardization_from_file(p, (2,))
    assert words in str(e.value)


def test_npz_without_x(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.zeros((2, 2)))
    with pytest.raises(DataError, match="no array 'x_train' or 'x'"):
        standardization_from_file(tmp_path / "d.npz", (2,))


def test_validate_preprocessing():
    assert validate_preprocessing(None, (2,)) == {}
    assert validate_preprocessing({"mean": [0, 1], "std": [1, 2]}, (2,)) == {"mean": [0.0, 1.0], "std": [1.0, 2.0]}
    for bad in ({"mean": [0], "std": [1]}, {"mean": [0, 0], "std": [1, 0]}, {"mean": [0, 0]}):
        with pytest.raises(UsageError):
            validate_preprocessing(bad, (2,))


def test_parse_shape():
    assert parse_shape("13") == (13,) and parse_shape("1,8,8") == (1, 8, 8) and parse_shape((1, 8, 8)) == (1, 8, 8)
    for bad in ("", "0", "-1", "a,b", "1,,x"):
        with pytest.raises(UsageError):
            parse_shape(bad)


# ---------------------------------------------------------------- hashing and the Python API


def test_model_hash_covers_fields_and_files_but_not_time():
    doc = {"format": "fleetlearn-bundle", "model_name": "m", "lr": 0.1, "created_at": "t1",
           "files": {"a": {"sha256": "1" * 64}, "b": {"sha256": "2" * 64}}}  # fmt: skip
    h = compute_model_hash(doc)
    assert compute_model_hash({**doc, "created_at": "t2", "model_hash": "x"}) == h
    assert compute_model_hash({**doc, "lr": 0.2}) != h
    assert compute_model_hash({**doc, "files": {"a": {"sha256": "1" * 64}, "b": {"sha256": "3" * 64}}}) != h
    assert compute_model_hash(json.loads(json.dumps(doc))) == h


def test_builtins():
    counts = {"boston-mlp": 1657, "digits-mlp": 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10}
    for name, n in counts.items():
        model, d = resolve_model(name, seed=3)
        assert sum(p.numel() for p in model.parameters()) == n and d.builtin and d.name == name
        again, _ = resolve_model(name, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    cnn, d = resolve_model("digits-cnn")
    assert d.input_shape == (1, 8, 8) and d.loss == "cross_entropy" and d.task == "classification"
    kinds = {type(m).__name__ for m in cnn.modules()}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout", "Linear"} <= kinds


def test_api_refusals_leave_nothing(tmp_path):
    model, _ = resolve_model("boston-mlp")
    cases = [
        (dict(loss="mse", task="classification"), "does not match loss"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(loss="mse", model_name="bad name!"), "model name"),
        (dict(loss="mse", preprocessing={"mean": [0.0], "std": [1.0]}), "13 elements"),
    ]
    for kwargs, words in cases:
        args = dict(model_name="m", input_shape=(13,))
        args.update(kwargs)
        with pytest.raises(UsageError) as e:
            build_bundle(model, tmp_path / "out", **args)
        assert words in str(e.value)
    with pytest.raises(UsageError, match="not a torch.nn.Module|needs a torch.nn.Module"):
        build_bundle(42, tmp_path / "out", model_name="m", input_shape=(13,), loss="mse")
    assert list(tmp_path.iterdir()) == []


def test_api_force_replaces_and_model_is_untouched(tmp_path):
    model, _ = resolve_model("digits-cnn", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "deep" / "er" / "b"
    rng = torch.get_rng_state()
    m1 = build_bundle(model, out, model_name="cnn", input_shape=(1, 8, 8), loss="cross_entropy")
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout in the traced forward drew from a forked RNG
    assert m1.raw["seed"] is None
    with pytest.raises(UsageError, match="already exists"):
        build_bundle(model, out, model_name="cnn", input_shape=(1, 8, 8), loss="cross_entropy")
    m2 = build_bundle(model, out, model_name="cnn2", input_shape=(1, 8, 8), loss="cross_entropy",
                      optimizer=OptimizerConfig.create("sgd", lr=0.1, momentum=0.5), force=True)  # fmt: skip
    assert m2.model_name == "cnn2" and m2.model_hash != m1.model_hash and m2.optimizer["momentum"] == 0.5
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]
    after = model.state_dict()  # export traces batch norm in training mode on a copy, never on the caller's model
    assert all(torch.equal(before[k], after[k]) for k in before)

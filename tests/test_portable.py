"""The portable engine (plain onnxruntime on the bundle's step graph) against torch, against the
onnxruntime-training engine on the same bundle, and against bad bundles.

Parity: the bundle is exported from a model, torch trains a copy of that model with the
optimizer the manifest describes, the portable engine trains the bundle, both on the same batches
in the same order (engines/base.py's loop: a seeded permutation), 20 steps with the last batch
smaller than the others. These tests run in the dev venv, where `onnxruntime` is the
onnxruntime-training build; its InferenceSession runs plain ONNX like the plain wheel does
(tests/test_portable_fleet.py runs the engine on the plain wheel).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import file_sha256, load_bundle
from fleetlearn.edge_runtime.core.data import Dataset
from fleetlearn.edge_runtime.core.errors import BundleError, ConfigError
from fleetlearn.edge_runtime.engines.base import epoch_order
from fleetlearn.edge_runtime.engines.select import choose_engine, open_engine

torch = pytest.importorskip("torch")
nn = torch.nn

BATCH, STEPS, LAST = 8, 20, 5  # 19 full batches of 8, then one of 5
N = BATCH * (STEPS - 1) + LAST


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))


def _layernorm_mlp():
    from tests.export_fixtures import layernorm_mlp

    torch.manual_seed(2)
    return layernorm_mlp()


def _bn_cnn():
    from tests.export_fixtures import bn_cnn

    torch.manual_seed(3)
    return bn_cnn()


CASES = {
    "mlp-adamw": (_mlp, (13,), "mse", dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, betas=(0.85, 0.995), eps=1e-7)),
    "mlp-sgd-momentum": (_mlp, (13,), "mse", dict(optimizer="sgd", lr=1e-2, momentum=0.9)),
    "layernorm-mlp-adamw": (_layernorm_mlp, (64,), "cross_entropy", dict(optimizer="adamw", lr=1e-2)),
    "bn-cnn-sgd-momentum": (_bn_cnn, (1, 8, 8), "cross_entropy", dict(optimizer="sgd", lr=5e-2, momentum=0.9)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (bundle dir, the torch model it was exported from); built on first use."""
    from fleetlearn.export import build_bundle

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            factory, shape, loss, opt = CASES[name]
            model = factory()
            out = tmp_path_factory.mktemp("portable") / name
            build_bundle(model, out, model_name=name, input_shape=shape, loss=loss, seed=None, **opt)
            cache[name] = (out, model)
        return cache[name]

    return get


def _data(manifest, n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *manifest.input_shape)).astype(np.float32)
    if manifest.label_is_index:
        y = rng.integers(0, manifest.num_classes, n).astype(np.int64)
    else:
        y = rng.standard_normal((n, *manifest.output_shape)).astype(np.float32)
    return Dataset(x, y)


def _torch_optimizer(manifest, params):
    o = manifest.optimizer
    if o["name"] == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
    return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"])


def _flat(model, manifest) -> np.ndarray:
    named = dict(model.named_parameters())
    return np.concatenate([named[p.name].detach().numpy().ravel() for p in manifest.params])


@pytest.mark.parametrize("case", list(CASES))
def test_portable_engine_trains_like_torch(exported, case):
    bundle, model = exported(case)
    manifest = load_bundle(bundle)
    assert manifest.engines == ("ort-training", "portable") and manifest.portable is not None
    engine = open_engine(bundle, manifest, "portable")
    assert engine.name == "portable"
    assert np.array_equal(engine.get_weights(), _flat(model, manifest))  # initial_state.f32 = the model's weights

    data = _data(manifest, N)
    result = engine.train(data, batch_size=BATCH, seed=7)
    assert result.steps == STEPS

    ref = copy.deepcopy(model).train()
    opt = _torch_optimizer(manifest, ref.parameters())
    loss_fn = {"mse": nn.functional.mse_loss, "cross_entropy": nn.functional.cross_entropy}[manifest.loss]
    order = epoch_order(7, 0, N)  # the order engines/base.py's loop uses
    loss_sum = 0.0
    for lo in range(0, N, BATCH):
        idx = order[lo : lo + BATCH]
        opt.zero_grad()
        loss = loss_fn(ref(torch.from_numpy(data.x[idx])), torch.from_numpy(data.y[idx]))
        loss.backward()
        opt.step()
        loss_sum += float(loss) * len(idx)

    got, want = engine.get_weights(), _flat(ref, manifest)
    scale = np.abs(want).max()
    assert np.max(np.abs(got - want)) / scale < 1e-5, f"max relative deviation {np.max(np.abs(got - want)) / scale:.2e}"
    assert result.mean_loss == pytest.approx(loss_sum / N, rel=1e-5)
    # BatchNorm's running statistics: the step graph updates them exactly as torch (unbiased variance).
    buffers = engine.optimizer_state()["buffers"]
    want_buffers = [dict(ref.named_buffers())[b.name].numpy().ravel() for b in manifest.portable.buffers]
    assert buffers.size == sum(w.size for w in want_buffers)
    if want_buffers:
        np.testing.assert_allclose(buffers, np.concatenate(want_buffers), rtol=1e-5, atol=1e-6)
    # Eval graph: eval-mode loss of the trained model.
    ref.eval()
    with torch.no_grad():
        want_eval = float(loss_fn(ref(torch.from_numpy(data.x)), torch.from_numpy(data.y)))
    assert engine.evaluate(data).loss == pytest.approx(want_eval, rel=1e-5)


@pytest.mark.parametrize("case", ["mlp-adamw", "layernorm-mlp-adamw"])
def test_the_two_engines_agree_on_one_bundle(exported, case):
    """Three 'rounds' as a device runs them: set the global weights, train, read them back.
    Optimizer state carries over between rounds in both engines."""
    bundle, _ = exported(case)
    manifest = load_bundle(bundle)
    ort_engine, portable = open_engine(bundle, manifest, "ort-training"), open_engine(bundle, manifest, "portable")
    assert (ort_engine.name, portable.name) == ("ort-training", "portable")
    np.testing.assert_array_equal(ort_engine.get_weights(), portable.get_weights())
    # Data seed 2: on a few draws (seed 1 with engines/base.py's epoch_order, seed 8 with the numpy
    # permutation it replaced; ~1 in 10) the engines' rounding differences grow to 1-5e-5 over
    # three rounds (AdamW, probably a ReLU input within rounding of 0); typical is 7e-7.
    data = _data(manifest, N, seed=2)
    for r in range(3):
        global_w = ort_engine.get_weights() + np.float32(0.01 * r)
        ort_engine.set_weights(global_w)
        portable.set_weights(global_w)
        a = ort_engine.train(data, batch_size=BATCH, seed=r, lr=2e-3)
        b = portable.train(data, batch_size=BATCH, seed=r, lr=2e-3)
        wa, wb = ort_engine.get_weights(), portable.get_weights()
        assert np.max(np.abs(wa - wb)) / np.abs(wa).max() < 1e-5
        assert a.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)
        ea, eb = ort_engine.evaluate(data), portable.evaluate(data)
        assert ea.loss == pytest.approx(eb.loss, rel=1e-5)
        assert ea.metric()[0] == eb.metric()[0] and ea.metric()[1] == pytest.approx(eb.metric()[1], rel=1e-4)


def test_dropout_model_trains_on_the_portable_engine(tmp_path):
    """digits-cnn has Dropout: not reproducible (onnxruntime's RNG), but it must train."""
    from fleetlearn.export import build_bundle, resolve_model

    model, d = resolve_model("digits-cnn", seed=0)
    manifest = build_bundle(model, tmp_path / "cnn", model_name=d.name, input_shape=d.input_shape, loss=d.loss,
                            optimizer="sgd", lr=0.05, momentum=0.9)  # fmt: skip
    assert manifest.portable is not None and manifest.portable.dropout
    engine = open_engine(tmp_path / "cnn", manifest, "portable")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200).astype(np.int64)
    x = (rng.standard_normal((200, 1, 8, 8)) * 0.3 + y[:, None, None, None] / 5).astype(np.float32)  # learnable
    data = Dataset(x, y)
    before = engine.evaluate(data)
    for epoch in range(10):
        engine.train(data, batch_size=16, seed=epoch)
    after = engine.evaluate(data)
    assert after.loss < before.loss * 0.8 and after.accuracy > before.accuracy + 0.15


# ------------------------------------------------------------------ bad bundles: one-line errors


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(bundle, edit):
    path = bundle / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    for name, entry in doc["files"].items():
        entry["sha256"], entry["size"] = file_sha256(bundle / name), (bundle / name).stat().st_size
    path.write_text(json.dumps(doc))


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


def test_missing_step_graph_is_a_one_line_error(exported, tmp_path):
    bundle = _copy(exported("mlp-adamw")[0], tmp_path)
    (bundle / "step_model.onnx").unlink()
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert "step_model.onnx is missing" in _one_line(e)
    # The manifest lists the portable engine but has no portable section.
    _rewrite_manifest(bundle, lambda d: (d.pop("portable"), d["files"].pop("step_model.onnx")))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert "missing field 'portable'" in _one_line(e)


def test_device_asking_for_portable_with_an_ort_only_bundle(exported, tmp_path):
    bundle = _copy(exported("mlp-adamw")[0], tmp_path)
    _rewrite_manifest(bundle, lambda d: (d.update(engines=["ort-training"]), d.pop("portable")))
    manifest = load_bundle(bundle)
    assert manifest.portable is None
    with pytest.raises(BundleError) as e:
        open_engine(bundle, manifest, "portable")
    assert "has no portable step graph" in _one_line(e)
    assert choose_engine(manifest, "auto") == "ort-training"  # still trains where ORT training exists
    with pytest.raises(BundleError) as e:
        only = _copy_without_ort(exported("mlp-adamw")[0], tmp_path)
        open_engine(only, load_bundle(only), "ort-training")
    assert "only carries: portable" in _one_line(e)


def _copy_without_ort(bundle, tmp_path):
    """A portable-only manifest (no ORT training files listed)."""
    src = tmp_path / "portable-only"
    shutil.copytree(bundle, src)
    _rewrite_manifest(src, lambda d: d.update(engines=["portable"]))
    return src


def _edit_graph(bundle, file, edit):
    import onnx

    model = onnx.load(bundle / file)
    edit(model)
    onnx.save(model, bundle / file)
    _rewrite_manifest(bundle, lambda d: None)


def test_step_graph_with_wrong_input_names_or_shapes(exported, tmp_path):
    import onnx

    src = exported("mlp-adamw")[0]

    def rename(model):
        old = model.graph.input[0].name  # params
        model.graph.input[0].name = "weights"
        for node in model.graph.node:
            node.input[:] = ["weights" if i == old else i for i in node.input]

    bundle = _copy(src, tmp_path / "a")
    _edit_graph(bundle, "step_model.onnx", rename)
    with pytest.raises(BundleError) as e:
        open_engine(bundle, load_bundle(bundle), "portable")
    assert "inputs" in _one_line(e) and "weights" in str(e.value)

    def reshape(model):  # params of any length: the graph loads, but it is not the manifest's [P]
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"

    bundle = _copy(src, tmp_path / "b")
    _edit_graph(bundle, "step_model.onnx", reshape)
    with pytest.raises(BundleError) as e:
        open_engine(bundle, load_bundle(bundle), "portable")
    assert "input 'params'" in _one_line(e)

    def fixed_batch(model):  # a graph fixed to one batch size would fail on the last batch
        x = next(i for i in model.graph.input if i.name == "input")
        x.type.tensor_type.shape.dim[0].dim_value = 8

    bundle = _copy(src, tmp_path / "c")
    _edit_graph(bundle, "portable_eval_model.onnx", fixed_batch)
    with pytest.raises(BundleError) as e:
        open_engine(bundle, load_bundle(bundle), "portable")
    assert "input 'input'" in _one_line(e)
    assert onnx  # the tests edit graphs with onnx; the engine itself never imports it


def test_step_graph_using_a_non_default_domain(exported, tmp_path):
    import onnx
    from onnx import helper

    def contrib(model):
        # com.microsoft's Gelu runs in every onnxruntime build, which is the point: the engine
        # refuses it because it is not standard ONNX, not because this onnxruntime cannot run it.
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        relu = next(n for n in model.graph.node if n.op_type == "Relu")
        relu.op_type, relu.domain = "Gelu", "com.microsoft"

    bundle = _copy(exported("mlp-adamw")[0], tmp_path)
    _edit_graph(bundle, "step_model.onnx", contrib)
    with pytest.raises(BundleError) as e:
        open_engine(bundle, load_bundle(bundle), "portable")
    assert "com.microsoft" in _one_line(e) and "standard ONNX" in str(e.value)
    assert onnx


def test_truncated_initial_state_and_garbage_graph(exported, tmp_path):
    bundle = _copy(exported("mlp-adamw")[0], tmp_path / "a")
    (bundle / "initial_state.f32").write_bytes(b"\0" * 12)
    _rewrite_manifest(bundle, lambda d: None)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert "initial_state" in _one_line(e)

    bundle = _copy(exported("mlp-adamw")[0], tmp_path / "b")
    (bundle / "step_model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    _rewrite_manifest(bundle, lambda d: None)
    with pytest.raises(BundleError) as e:
        open_engine(bundle, load_bundle(bundle), "portable")
    _one_line(e)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(engines="portable"), "engines must be"),
        (lambda d: d.update(engines=["warp-drive"]), "none this device knows"),
        (lambda d: d["portable"].update(optimizer_state=["sgd_momentum"]), "does not match optimizer"),
        (lambda d: d["portable"].update(num_buffers=3), "num_buffers"),
        (lambda d: d["portable"].update(step_model="../x.onnx"), "not among the bundle's files"),
        (lambda d: d["portable"].update(onnx={"opset": 17, "ir_version": 8}), "opset 17"),
        (lambda d: d["optimizer"].update(name="sgd", momentum="lots"), "does not match optimizer"),
    ],
)
def test_hostile_portable_manifest_fields(exported, tmp_path, edit, needle):
    bundle = _copy(exported("mlp-adamw")[0], tmp_path)
    _rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert needle in _one_line(e)


def test_device_config_engine_key_is_strict(tmp_path):
    from fleetlearn.edge_runtime.device.config import parse_device_config

    base = {"device_id": "d", "fleet": "f", "broker": "mqtt://h:1", "bundle": "b", "data": "x", "state_dir": "s"}
    assert parse_device_config(base).training.engine == "auto"
    assert parse_device_config({**base, "training": {"engine": "portable"}}).training.engine == "portable"
    with pytest.raises(ConfigError, match="training.engine"):
        parse_device_config({**base, "training": {"engine": "gpu"}})
    with pytest.raises(ConfigError, match="training.engine"):
        parse_device_config({**base, "training": {"engine": 1}})


def test_training_loads_neither_numpy_random_nor_a_second_session(exported, tmp_path):
    """A device process only trains: importing numpy.random cost it ~7 MB of RSS and an open eval
    session ~0.4 MB (docs/benchmarks.md). A real process trains an epoch without either; the eval
    graph is still checked at open, and evaluate() opens it when asked."""
    import subprocess
    import sys

    bundle = exported("mlp-adamw")[0]
    probe = (
        "import sys\n"
        "import numpy as np\n"
        "from fleetlearn.edge_runtime.core.bundle import load_bundle\n"
        "from fleetlearn.edge_runtime.core.data import Dataset\n"
        "from fleetlearn.edge_runtime.engines.select import open_engine\n"
        "m = load_bundle(sys.argv[1])\n"
        "e = open_engine(sys.argv[1], m, 'portable')\n"
        "x = np.linspace(-1, 1, 40 * m.input_shape[0], dtype=np.float32).reshape(40, *m.input_shape)\n"
        "d = Dataset(x, np.ones((40, *m.output_shape), np.float32))\n"
        "r = e.train(d, batch_size=8, epochs=2, seed=[3, 1, 4])\n"
        "print(r.steps, 'numpy.random' in sys.modules, e._eval_session is None)\n"
        "print(np.isfinite(e.evaluate(d).loss), e._eval_session is None)\n"
    )
    # cwd outside the checkout: its fleetlearn/ folder must not shadow the installed package
    r = subprocess.run([sys.executable, "-c", probe, str(bundle)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["10 False True", "True False"], r.stdout


def test_epoch_order_is_a_seeded_shuffle():
    n = 50
    orders = {(repr(s), e): epoch_order(s, e, n) for s in (0, 1, [1, 2], [2, 1]) for e in (0, 1)}
    for o in orders.values():
        assert sorted(o.tolist()) == list(range(n))
    keys = [tuple(o.tolist()) for o in orders.values()]
    assert len(set(keys)) == len(keys)  # each seed and epoch its own order
    assert np.array_equal(epoch_order([1, 2], 1, n), epoch_order([1, 2], 1, n))
    # Uniform enough: over 3,000 seeds each of the 6 orders of 3 samples turns up 500 +- 5 sigma.
    counts: dict[tuple, int] = {}
    for s in range(3000):
        k = tuple(epoch_order(s, 0, 3).tolist())
        counts[k] = counts.get(k, 0) + 1
    assert len(counts) == 6 and all(abs(c - 500) < 5 * 20.4 for c in counts.values()), counts

"""FedProx's proximal term in the bundle: both engines against torch, mu = 0 against a bundle
without the term, and a bundle without the term asked for mu > 0.

Parity: torch trains a copy of the exported model on loss + mu/2 * sum ||w - w_g||^2 with the
optimizer the manifest describes, from w_g (the 'global model', moved away from the export's
initial weights so that the term is not zero at the start); each engine is given w_g with
set_weights and trains with mu on the same batches in the same order (engines/base.py's seeded
permutation), 20 steps, the last batch smaller.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.data import Dataset
from fleetlearn.edge_runtime.core.errors import BundleError
from fleetlearn.edge_runtime.engines.base import epoch_order
from fleetlearn.edge_runtime.engines.select import open_engine

torch = pytest.importorskip("torch")
nn = torch.nn

BATCH, STEPS, LAST = 8, 20, 5
N = BATCH * (STEPS - 1) + LAST
MU = 0.5  # large enough that the term moves the result far beyond the tolerance (checked below)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))


OPTIMIZERS = {
    "adamw": dict(optimizer="adamw", lr=3e-3, weight_decay=0.05, betas=(0.85, 0.995), eps=1e-7),
    "sgd-momentum": dict(optimizer="sgd", lr=1e-2, momentum=0.9),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(optimizer, proximal) -> (bundle dir, torch model); built on first use."""
    from fleetlearn.export import build_bundle

    cache: dict[tuple[str, bool], tuple] = {}

    def get(opt: str, proximal: bool = True):
        if (opt, proximal) not in cache:
            model = _mlp()
            out = tmp_path_factory.mktemp("fedprox") / f"{opt}-{'prox' if proximal else 'plain'}"
            build_bundle(
                model, out, model_name="prox-mlp", input_shape=(13,), loss="mse", seed=None, proximal=proximal, **OPTIMIZERS[opt]
            )
            cache[(opt, proximal)] = (out, model)
        return cache[(opt, proximal)]

    return get


def _data(n: int = N, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((n, 13)).astype(np.float32), rng.standard_normal((n, 1)).astype(np.float32))


def _flat(model, manifest) -> np.ndarray:
    named = dict(model.named_parameters())
    return np.concatenate([named[p.name].detach().numpy().ravel() for p in manifest.params])


def _load_flat(model, manifest, flat: np.ndarray) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for p in manifest.params:
            named[p.name].copy_(torch.from_numpy(flat[p.offset : p.offset + p.size].reshape(p.shape)))


def _global(engine) -> np.ndarray:
    """A 'global model' away from the initial weights (deterministic)."""
    w = engine.get_weights()
    return (w + np.random.default_rng(5).standard_normal(w.shape).astype(np.float32) * 0.05).astype(np.float32)


def _torch_prox(model, manifest, w_global: np.ndarray, data: Dataset, mu: float, seed: int):
    """K steps of torch on loss + mu/2 ||w - w_g||^2 from w_g; (flat weights, mean data loss)."""
    ref = copy.deepcopy(model).train()
    _load_flat(ref, manifest, w_global)
    anchor = [p.detach().clone() for p in ref.parameters()]
    o = manifest.optimizer
    if o["name"] == "adamw":
        opt = torch.optim.AdamW(
            ref.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"]
        )
    else:
        opt = torch.optim.SGD(ref.parameters(), lr=o["lr"], momentum=o["momentum"])
    order = epoch_order(seed, 0, N)  # the order engines/base.py's loop uses
    loss_sum = 0.0
    for lo in range(0, N, BATCH):
        idx = order[lo : lo + BATCH]
        opt.zero_grad()
        loss = nn.functional.mse_loss(ref(torch.from_numpy(data.x[idx])), torch.from_numpy(data.y[idx]))
        prox = sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
        (loss + mu / 2 * prox).backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(idx)
    return _flat(ref, manifest), loss_sum / N


@pytest.mark.parametrize("engine_name", ["ort-training", "portable"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_proximal_training_matches_torch(bundles, opt, engine_name):
    bundle, model = bundles(opt)
    manifest = load_bundle(bundle)
    assert manifest.proximal and manifest.raw["proximal"] is True
    engine = open_engine(bundle, manifest, engine_name)
    assert engine.name == engine_name
    w_g = _global(engine)
    engine.set_weights(w_g)
    data = _data()
    result = engine.train(data, batch_size=BATCH, seed=7, mu=MU)
    assert result.steps == STEPS
    want, want_loss = _torch_prox(model, manifest, w_g, data, MU, seed=7)
    got = engine.get_weights()
    scale = np.abs(want).max()
    dev = np.max(np.abs(got - want)) / scale
    assert dev < 1e-5, f"max relative deviation from torch {dev:.2e}"
    assert result.mean_loss == pytest.approx(want_loss, rel=1e-5)  # the data loss, not the objective
    # The term did something: without it torch ends far from where it ends with it.
    plain, _ = _torch_prox(model, manifest, w_g, data, 0.0, seed=7)
    assert np.max(np.abs(plain - want)) / scale > 100 * 1e-5
    # ... and it pulls toward w_g.
    assert np.linalg.norm(got - w_g) < np.linalg.norm(plain - w_g)


@pytest.mark.parametrize("engine_name", ["ort-training", "portable"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_mu_zero_is_exactly_a_bundle_without_the_term(bundles, opt, engine_name):
    """Two rounds each (optimizer state carries over), bit for bit."""
    with_term, _ = bundles(opt, proximal=True)
    without, _ = bundles(opt, proximal=False)
    m_with, m_without = load_bundle(with_term), load_bundle(without)
    assert m_with.proximal and not m_without.proximal and "proximal" in m_without.raw
    a, b = open_engine(with_term, m_with, engine_name), open_engine(without, m_without, engine_name)
    np.testing.assert_array_equal(a.get_weights(), b.get_weights())
    data = _data(seed=3)
    for r in range(2):
        w_g = _global(a) + np.float32(0.01 * r)
        a.set_weights(w_g)
        b.set_weights(w_g)
        ra = a.train(data, batch_size=BATCH, seed=r, mu=0.0)
        rb = b.train(data, batch_size=BATCH, seed=r)
        np.testing.assert_array_equal(a.get_weights(), b.get_weights())
        assert ra.mean_loss == rb.mean_loss
        assert a.evaluate(data).loss == b.evaluate(data).loss


@pytest.mark.parametrize("engine_name", ["ort-training", "portable"])
def test_a_bundle_without_the_term_refuses_mu_before_any_step(bundles, engine_name):
    bundle, _ = bundles("adamw", proximal=False)
    manifest = load_bundle(bundle)
    engine = open_engine(bundle, manifest, engine_name)
    before = engine.get_weights()
    with pytest.raises(BundleError, match="no proximal term"):
        engine.train(_data(), batch_size=BATCH, mu=0.01)
    np.testing.assert_array_equal(engine.get_weights(), before)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            engine.train(_data(), batch_size=BATCH, mu=bad)


def test_a_manifest_from_before_fedprox_reads_as_without_the_term(bundles, tmp_path):
    """Bundles written before this field existed have no `proximal` key at all."""
    import json
    import shutil

    from fleetlearn.export.manifest import compute_model_hash

    bundle, _ = bundles("adamw", proximal=False)
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    doc = json.loads((old / "manifest.json").read_text())
    del doc["proximal"]
    doc["model_hash"] = compute_model_hash(doc)
    (old / "manifest.json").write_text(json.dumps(doc))
    manifest = load_bundle(old)
    assert manifest.proximal is False
    doc["proximal"] = "yes"
    doc["model_hash"] = compute_model_hash(doc)
    (old / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="proximal must be true or false"):
        load_bundle(old)

"""Partitioners (edge_runtime/core/partition.py): determinism, coverage, the promised skew, bad specs."""

from __future__ import annotations

import numpy as np
import pytest

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.partition import (
    PartitionError,
    PartitionSpec,
    labels_for,
    parse_partition,
    partition,
    quantile_classes,
)

SPECS = ["iid", "dirichlet:0.1", "dirichlet:100", "shards:2", "shards:1", "quantity:0.5", "quantity:0.1"]


@pytest.fixture(scope="module")
def ten_classes():
    """1000 samples of 10 balanced classes, in a random order."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))


def _top_label_share(labels, parts, top=2):
    """Per device, the fraction of its samples that belong to its `top` most common labels."""
    out = []
    for p in parts:
        counts = np.sort(np.bincount(labels[p], minlength=10))[::-1]
        out.append(counts[:top].sum() / len(p))
    return np.array(out)


@pytest.mark.parametrize("spec", SPECS)
def test_every_sample_goes_to_exactly_one_device_and_no_device_is_empty(spec, ten_classes):
    for devices in (1, 7, 10):
        parts = partition(spec, ten_classes, devices, seed=3)
        assert len(parts) == devices
        assert all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
        everything = np.concatenate(parts)
        assert len(everything) == len(ten_classes)
        assert np.array_equal(np.sort(everything), np.arange(len(ten_classes)))


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_partition_other_seed_another(spec, ten_classes):
    a = partition(spec, ten_classes, 10, seed=5)
    b = partition(spec, ten_classes, 10, seed=5)
    c = partition(spec, ten_classes, 10, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one_and_labels_are_mixed(ten_classes):
    parts = partition("iid", ten_classes, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(ten_classes[p])) == 10 for p in parts)


def test_iid_is_the_demos_historical_random_sharding():
    """iid is exactly what `fleetlearn demo` always did, so its documented numbers still hold."""
    n, devices, seed = 404, 3, 0
    old = np.array_split(np.random.default_rng(seed).permutation(n), devices)
    assert all(np.array_equal(a, b) for a, b in zip(old, partition("iid", np.zeros(n), devices, seed)))


def test_dirichlet_small_alpha_gives_devices_dominated_by_few_labels(ten_classes):
    skewed = _top_label_share(ten_classes, partition("dirichlet:0.1", ten_classes, 10, seed=1))
    near_iid = _top_label_share(ten_classes, partition("dirichlet:100", ten_classes, 10, seed=1))
    # Balanced data: an IID device's two top labels hold ~20-25% of it.
    assert np.median(skewed) > 0.8, skewed
    assert near_iid.max() < 0.35, near_iid


def test_shards_give_each_device_about_k_labels(ten_classes):
    parts = partition("shards:2", ten_classes, 10, seed=2)
    # 20 shards of 50 samples over 10 classes of 100: each shard holds one label.
    assert all(len(np.unique(ten_classes[p])) <= 2 for p in parts)
    assert sorted(len(p) for p in parts) == [100] * 10


def test_quantity_gives_unequal_sizes_with_iid_contents(ten_classes):
    parts = partition("quantity:0.5", ten_classes, 10, seed=4)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() >= 3 * sizes.min() and sizes.std() > 0.4 * sizes.mean(), sizes
    big = parts[int(np.argmax(sizes))]
    assert len(np.unique(ten_classes[big])) == 10  # contents stay mixed
    equal = np.array([len(p) for p in partition("quantity:1e6", ten_classes, 10, seed=4)])
    assert equal.max() - equal.min() <= 5


def test_regression_targets_are_binned_into_quantile_classes():
    y = np.random.default_rng(0).gamma(2.0, 10.0, size=400)
    classes = quantile_classes(y, 10)
    assert sorted(np.bincount(classes).tolist()) == [40] * 10  # equal-count bins
    assert all(y[classes == c].max() <= y[classes == c + 1].min() for c in range(9))  # ordered bands
    assert np.array_equal(labels_for(y.reshape(-1, 1), "regression"), classes)
    assert np.array_equal(labels_for(np.array([3.0, 1.0]), "classification"), [3, 1])


def test_shards_on_a_regression_target_are_bands_of_the_target():
    y = np.random.default_rng(0).normal(22, 9, size=404)
    parts = partition("shards:1", y, 4, seed=0, task="regression")
    bands = sorted((y[p].min(), y[p].max()) for p in parts)
    assert all(hi < lo_next for (_, hi), (lo_next, _) in zip(bands, bands[1:]))  # disjoint bands
    skew = partition("dirichlet:0.1", y, 4, seed=0, task="regression")
    assert len(np.concatenate(skew)) == 404


def test_more_devices_than_samples_and_too_many_shards_are_errors():
    with pytest.raises(PartitionError, match="at least one sample"):
        partition("iid", np.arange(3), 4, seed=0)
    with pytest.raises(PartitionError, match="needs at least 40 samples"):
        partition("shards:4", np.arange(30) % 3, 10, seed=0)


def test_tiny_alpha_still_leaves_no_device_empty():
    labels = np.arange(12) % 2
    for seed in range(20):
        assert all(len(p) >= 1 for p in partition("dirichlet:0.0001", labels, 12, seed))
        assert all(len(p) >= 1 for p in partition("quantity:0.0001", labels, 12, seed))


@pytest.mark.parametrize(
    "text, expected",
    [("iid", PartitionSpec("iid")), (" Dirichlet:0.1 ", PartitionSpec("dirichlet", 0.1)),
     ("shards:2", PartitionSpec("shards", 2)), ("quantity:0.5", PartitionSpec("quantity", 0.5))],
)  # fmt: skip
def test_specs_parse_and_print_back(text, expected):
    assert parse_partition(text) == expected
    assert parse_partition(str(expected)) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [("random", "unknown partition"), ("iid:3", "takes no parameter"), ("dirichlet", "needs a parameter"),
     ("dirichlet:", "needs a parameter"), ("dirichlet:abc", "alpha must be"), ("dirichlet:0", "alpha must be"),
     ("quantity:-1", "alpha must be"), ("quantity:nan", "alpha must be"), ("quantity:inf", "alpha must be"),
     ("shards:0", "positive integer"), ("shards:1.5", "positive integer"), (3, "must be a string")],
)  # fmt: skip
def test_bad_specs_are_one_line_usage_errors(text, fragment):
    with pytest.raises(UsageError, match=fragment) as err:
        parse_partition(text)
    assert "\n" not in str(err.value)

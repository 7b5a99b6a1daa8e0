import numpy as np
import pytest

from fedsynth.config import ConfigError, PartitionConfig
from fedsynth.data.partition import (
    PARTITIONERS,
    assign_disjoint_classes,
    histograms,
    partition,
    quantity_sizes,
)


@pytest.fixture(scope="module")
def labels():
    from fedsynth.config import DataConfig
    from fedsynth.data.datasets import load_dataset

    split = load_dataset(DataConfig())
    return split.full.labels.numpy()[split.train_indices]


def _cfg(scheme, **kw):
    return PartitionConfig(scheme=scheme, **kw)


@pytest.mark.parametrize("scheme", list(PARTITIONERS))
def test_every_scheme_covers_disjointly_and_is_deterministic(labels, scheme):
    cfg = _cfg(scheme, num_clients=10)
    parts = partition(labels, cfg, seed=3)
    assert len(parts) == 10
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())), "a sample is held by two clients"
    assert set(flat.tolist()) == set(range(len(labels))), "some training sample is held by nobody"
    again = partition(labels, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme == "class_disjoint":
        return  # one class per client here: nothing left to chance
    other = partition(labels, cfg, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_histograms_match_counts(labels):
    parts = partition(labels, _cfg("iid", num_clients=4), seed=0)
    hist = histograms(labels, parts, 10)
    assert hist.shape == (4, 10)
    assert (hist.sum(0) == np.bincount(labels)).all()
    assert [h.sum() for h in hist] == [len(p) for p in parts]


def test_iid_sizes_equal(labels):
    sizes = [len(p) for p in partition(labels, _cfg("iid", num_clients=7), seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_class_disjoint_no_shared_class(labels):
    parts = partition(labels, _cfg("class_disjoint", num_clients=8), seed=0)
    classes = [set(labels[p].tolist()) for p in parts]
    for i in range(8):
        for j in range(i + 1, 8):
            assert classes[i].isdisjoint(classes[j])
    assert set().union(*classes) == set(range(10))


def test_assign_disjoint_classes_by_hand():
    # 3 clients, classes of sizes 50, 40, 30, 20: largest-first to the lightest client
    # 0(50)→c0, 1(40)→c1, 2(30)→c2, 3(20)→c2 (load 30 < 40 < 50)
    assert assign_disjoint_classes(np.array([50, 40, 30, 20]), 3) == [[0], [1], [2, 3]]
    # 5 clients, 3 classes (90, 30, 20): extra clients go to the class with the largest
    # per-holder share: 90/1 → class 0 (45 each), then 45 > 30 → class 0 again (30 each)
    assert assign_disjoint_classes(np.array([90, 30, 20]), 5) == [[0], [0], [0], [1], [2]]


def test_class_disjoint_more_clients_than_classes(labels):
    parts = partition(labels, _cfg("class_disjoint", num_clients=13), seed=0)
    hist = histograms(labels, parts, 10)
    assert ((hist > 0).sum(1) == 1).all()  # each client still holds exactly one class
    holders = (hist > 0).sum(0)
    assert holders.sum() == 13 and holders.max() == 2
    counts = np.bincount(labels)
    split_classes = np.flatnonzero(holders == 2)
    assert counts[split_classes].min() >= np.sort(counts)[-3]  # the 3 most frequent


def test_dirichlet_extreme_alpha(labels):
    flat = partition(labels, _cfg("dirichlet", num_clients=5, alpha=1000.0), seed=0)
    share = histograms(labels, flat, 10) / np.bincount(labels)
    assert np.abs(share - 0.2).max() < 0.1  # near IID proportions
    skew = partition(labels, _cfg("dirichlet", num_clients=5, alpha=0.05, min_samples=5), seed=0)
    hist = histograms(labels, skew, 10)
    dominant = hist.max(1) / hist.sum(1)
    assert np.median(dominant) > 0.4  # clients are dominated by few classes
    assert min(len(p) for p in skew) >= 5


def test_dirichlet_impossible_min_is_one_line_error(labels):
    with pytest.raises(ConfigError, match="dirichlet partition impossible"):
        partition(labels, _cfg("dirichlet", num_clients=10, alpha=0.5, min_samples=500), seed=0)


def test_pathological_classes_per_client(labels):
    parts = partition(labels, _cfg("pathological", num_clients=10, classes_per_client=2), seed=0)
    hist = histograms(labels, parts, 10)
    assert ((hist > 0).sum(1) == 2).all()
    with pytest.raises(ConfigError, match="classes_per_client"):
        partition(labels, _cfg("pathological", num_clients=10, classes_per_client=11), seed=0)


def test_quantity_sizes_by_hand():
    rng = np.random.default_rng(0)
    sizes = quantity_sizes(100, PartitionConfig(num_clients=4, alpha=0.5, min_samples=10), rng)
    assert sizes.sum() == 100 and sizes.min() >= 10
    with pytest.raises(ConfigError, match="quantity partition needs"):
        quantity_sizes(30, PartitionConfig(num_clients=4, min_samples=10), rng)


def test_quantity_is_label_iid_but_sizes_skewed(labels):
    parts = partition(labels, _cfg("quantity", num_clients=6, alpha=0.3), seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()


def test_too_many_clients():
    with pytest.raises(ConfigError, match="only 3 training samples"):
        partition(np.array([0, 1, 0]), _cfg("iid", num_clients=4), seed=0)


def test_one_seed_derivation_is_seedsequence_of_seed_purpose_and_ids():
    import zlib

    from fedsynth.core.seeding import derive, numpy_rng, torch_generator

    entropy = [7, zlib.crc32(b"select"), 3, 1]
    expected = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1
    assert derive(7, "select", 3, 1) == expected < 2**63
    assert len({derive(7, "select", 3, 1), derive(7, "select", 1, 3), derive(7, "usplit", 3, 1)}) == 3
    assert numpy_rng(7, "x", 1).integers(1 << 30) == numpy_rng(7, "x", 1).integers(1 << 30)
    assert torch_generator(7, "x", 1).initial_seed() == derive(7, "x", 1)
    with pytest.raises(ValueError, match="non-negative"):
        derive(7, "select", -1)

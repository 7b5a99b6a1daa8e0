import numpy as np
import pytest

from fedsynth.evaluation.metrics import (
    classification_scores,
    coverage_fraction,
    distance_from_uniform,
    fd_between,
    frechet_distance,
    inception_style_score,
    knn_radii,
    memorisation,
    nearest_distances,
    precision_recall,
)


def test_frechet_closed_form_diagonal_gaussians():
    # ‖μ1−μ2‖² = 1 + 4 = 5; Σ_i (σ1 + σ2 − 2√(σ1σ2)) = (1+4−4) + (4+1−4) = 2  →  7
    fd = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 1.0]))
    assert fd == pytest.approx(7.0)


def test_frechet_full_covariance_matches_formula():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    # identical covariances: FD is the squared mean distance alone
    assert frechet_distance(np.zeros(2), s1, np.array([3.0, 4.0]), s1) == pytest.approx(25.0)


def test_frechet_non_commuting_covariances_by_hand():
    # Σ1 = I, Σ2 = [[2, 1], [1, 2]] (eigenvalues 3, 1): Tr((Σ1Σ2)^½) = √3 + 1,
    # FD = 0 + 2 + 4 − 2(√3 + 1) = 2 − 2√3 + 2 = 4 − 2√3
    s2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), s2) == pytest.approx(4 - 2 * np.sqrt(3))
    # Σ1 = diag(1, 4), Σ2 = [[1, 1], [1, 4]]: Σ1Σ2 = [[1, 1], [4, 16]], trace 17, det 12,
    # λ = (17 ± √241) / 2, so Tr((Σ1Σ2)^½) = √(λ₊) + √(λ₋) = √(17 + 2√12)
    s1, s2 = np.diag([1.0, 4.0]), np.array([[1.0, 1.0], [1.0, 4.0]])
    expected = 5 + 5 - 2 * np.sqrt(17 + 2 * np.sqrt(12))
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected)


def test_frechet_rank_deficient_high_dimensional_matches_sqrtm(rng):
    """Fewer samples than dimensions (singular covariances), as with 2048-d features of a
    small set: agrees with the matrix-square-root formula."""
    from scipy import linalg

    a, b = rng.normal(size=(12, 64)), rng.normal(size=(12, 64)) * 1.5 + 0.2
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0), b.mean(0)
    root = np.real(linalg.sqrtm(s1 @ s2))
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fd_of_a_set_with_itself_is_zero(rng):
    x = rng.normal(size=(500, 8))
    assert fd_between(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fd_between(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_knn_radii_by_hand():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    assert knn_radii(x, 2, chunk=3).tolist() == [3.0, 2.0, 3.0, 6.0]  # rows taken in slices


def test_neighbour_metrics_do_not_depend_on_the_chunk():
    """Distances are computed a slice of rows at a time (memory); the results are the whole
    matrix's: k-th neighbour radii by sorting each full row, coverage from the full matrix."""
    gen = np.random.default_rng(0)
    a, b = gen.normal(size=(300, 5)), gen.normal(size=(200, 5)) + 0.3
    full = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(knn_radii(a, 3, chunk=64), np.sort(full, axis=1)[:, 3], rtol=1e-9, atol=1e-9)
    radii = knn_radii(a, 3)
    cross = np.sqrt(((b[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    want = float((cross <= radii[None, :]).any(axis=1).mean())
    assert coverage_fraction(b, a, radii, chunk=17) == pytest.approx(want)
    assert 0.0 < want < 1.0


def test_precision_recall_constructed_clouds():
    real = np.array([[float(i), 0.0] for i in range(10)])  # k=3 radius: 3 (ends), 2 (middle)
    fake_in = real[:5] + np.array([0.0, 0.5])  # inside real balls
    fake_out = np.array([[100.0 + i, 100.0] for i in range(5)])  # far away
    p, r = precision_recall(real, np.vstack([fake_in, fake_out]), k=3)
    assert p == pytest.approx(0.5)
    # fake_in sits at (i, 0.5), i = 0..4; its k=3 radii are 3 at i = 0, 4 and 2 otherwise.
    # Real (6, 0) is √(4 + 0.25) ≈ 2.06 ≤ 3 from (4, 0.5): covered; real (7, 0) is
    # √(9 + 0.25) ≈ 3.04 > 3: not. So real points 0..6 are covered: recall 7/10.
    assert r == pytest.approx(0.7)
    p, r = precision_recall(real, real.copy(), k=3)
    assert (p, r) == (1.0, 1.0)


def test_classification_scores_macro():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    s = classification_scores(y, pred, 3)
    assert s["accuracy"] == pytest.approx(0.75)
    # class 0: P 1, R .5; class 1: P 2/3, R 1; class 2 absent: 0 → macro over 3 classes
    assert s["precision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s["recall"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_inception_style_score_extremes():
    uniform = np.full((100, 4), 0.25)
    assert inception_style_score(uniform)[0] == pytest.approx(1.0)
    confident = np.eye(4)[np.arange(100) % 4]  # sharp and evenly spread over 4 classes
    assert inception_style_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-6)
    # stored class by class (as synthetic folders are): splits must still see every class
    sorted_rows = np.eye(4)[np.repeat(np.arange(4), 250)]
    assert inception_style_score(sorted_rows, splits=10)[0] > 3.5


def test_distance_from_uniform_by_hand():
    assert distance_from_uniform(np.array([5, 5, 5, 5])) == {"tv": 0.0, "kl": 0.0}
    one = distance_from_uniform(np.array([8, 0, 0, 0]))
    assert one["tv"] == pytest.approx(0.75) and one["kl"] == pytest.approx(np.log(4))


def test_nearest_distances_and_memorisation():
    train = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert nearest_distances(np.array([[0.0, 1.0]]), train).tolist() == [1.0]
    # train-to-train nearest distances: 2, 2, 2 → typical 2
    copies = memorisation(train + 0.1, train, ratio=0.5)
    assert copies["train_nn_median"] == pytest.approx(2.0)
    assert copies["near_copy_fraction"] == 1.0  # 0.1·√2 / 2 ≈ 0.07 < 0.5
    far = memorisation(train + 5.0, train, ratio=0.5)
    assert far["near_copy_fraction"] == 0.0


def test_precision_recall_with_too_few_images_is_a_clear_error():
    from fedsynth.core.errors import DataError

    with pytest.raises(DataError, match=r"need more than 3 images in each set; got 3 real and 10 generated"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


def test_label_fidelity_by_hand():
    from fedsynth.evaluation.metrics import label_fidelity

    intended = np.array([0, 0, 0, 0, 1, 1, 2])
    judged = np.array([0, 0, 1, 2, 1, 0, 2])
    out = label_fidelity(intended, judged, ("a", "b", "c", "d"))
    assert out["label_fidelity"] == pytest.approx(4 / 7)  # 2 of class a, 1 of b, 1 of c
    assert out["label_fidelity_per_class"] == {"a": 0.5, "b": 0.5, "c": 1.0, "d": None}

"""Values of ADM's metrics on features whose answer is known in closed form or by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ortho_group

from usp.evaluate.metrics import (
    compute_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)


# ---------------------------------------------------------------- Fréchet distance
def _closed_form(mu1, lam1, mu2, lam2) -> float:
    """FD of Gaussians whose covariances share eigenvectors: |mu1 - mu2|² + Σ (√λ1 - √λ2)²."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(lam1) - np.sqrt(lam2)) ** 2).sum())


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    lam1, lam2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    got = frechet_distance(mu1, np.diag(lam1), mu2, np.diag(lam2), matrix_sqrt=method)
    assert got == pytest.approx(_closed_form(mu1, lam1, mu2, lam2), rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_commuting_closed_form(method):
    rng = np.random.default_rng(1)
    d = 12
    q = ortho_group.rvs(d, random_state=1)  # shared eigenvectors: the covariances commute
    lam1, lam2 = rng.uniform(0.0, 2, d), rng.uniform(0.5, 4, d)
    lam1[:3] = 0.0  # and one of them is singular
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = frechet_distance(mu1, q @ np.diag(lam1) @ q.T, mu2, q @ np.diag(lam2) @ q.T, matrix_sqrt=method)
    assert got == pytest.approx(_closed_form(mu1, lam1, mu2, lam2), rel=1e-6)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_zero_for_identical_statistics(method):
    rng = np.random.default_rng(2)
    mu, sigma = compute_statistics(rng.normal(size=(500, 32)))
    assert abs(frechet_distance(mu, sigma, mu, sigma, matrix_sqrt=method)) < 1e-8


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_rank_deficient_is_finite_and_right(method):
    """10 samples in 64-d: both covariances have rank 9; ADM's path must stay finite and agree with the trace of
    the square root computed from the eigenvalues of sigma1·sigma2 (all real and >= 0)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.3
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    got = frechet_distance(mu1, s1, mu2, s2, matrix_sqrt=method)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(frechet_distance(mu1, s1, mu1, s1, matrix_sqrt=method)) < 1e-4


def test_frechet_distance_methods_agree_on_feature_statistics():
    rng = np.random.default_rng(11)
    (mu1, s1), (mu2, s2) = compute_statistics(rng.gamma(2.0, size=(300, 128))), compute_statistics(
        rng.gamma(2.5, size=(200, 128)))
    assert frechet_distance(mu1, s1, mu2, s2, matrix_sqrt="eigh") == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2, matrix_sqrt="sqrtm"), rel=1e-9)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary component"):  # not a covariance: ADM raises too
        frechet_distance(np.zeros(2), np.diag([-4.0, 1.0]), np.zeros(2), np.eye(2))


def test_compute_statistics_matches_numpy():
    x = np.random.default_rng(4).normal(size=(1000, 20)).astype(np.float32) * 3 + 1
    mu, sigma = compute_statistics(x, chunk=64)  # several chunks
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- Inception score
def test_inception_score_one_for_identical_predictions():
    logits = np.tile(np.random.default_rng(5).normal(size=(1, 1008)), (40, 1))
    assert inception_score(logits) == pytest.approx(1.0, abs=1e-9)


def test_inception_score_equals_class_count_for_confident_even_predictions():
    classes = 10
    probs = np.eye(classes)[np.arange(200) % classes]  # one-hot, every class equally often
    assert inception_score(probs) == pytest.approx(classes, rel=1e-9)
    logits = probs * 50.0  # confident logits: softmax ≈ one-hot
    assert inception_score(logits, kind="logits") == pytest.approx(classes, rel=1e-6)


def test_inception_score_splits_and_entropy_form():
    """IS = exp(H(mean p) - mean H(p)) per split, averaged over splits (ADM, split_size rows each)."""
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.full(7, 0.3), size=30)

    def entropy(p):
        return -(p * np.log(p)).sum(-1)

    expected = np.mean([np.exp(entropy(s.mean(0)) - entropy(s).mean()) for s in (probs[:12], probs[12:24], probs[24:])])
    assert inception_score(probs, split_size=12) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- precision / recall
def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Direct definition: full distance matrices, radius = k-th neighbour distance excluding the point itself."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(d2(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    cross = d2(real, fake)  # (N_real, N_fake)
    precision = (cross <= r_real[:, None]).any(0).mean()
    recall = (cross <= r_fake[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_identical_sets():
    x = np.random.default_rng(7).normal(size=(64, 32)).astype(np.float32)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(50, 16)).astype(np.float32)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_hand_built_square():
    """Real points: the unit square's corners, each radius² = 2 (its 3rd neighbour is the opposite corner).
    Fake: two points inside that reach, two far away -> precision 1/2. The fake set's radii reach every corner
    from (0.5, 0.5) -> recall 1."""
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    fake = np.array([[0.5, 0.5], [0, 0.1], [5, 5], [10, 0]], np.float32)
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)
    assert _brute_force_pr(real, fake, 3) == (0.5, 1.0)


@pytest.mark.parametrize("block", [2, 7, 10_000])
def test_precision_recall_matches_brute_force(block):
    rng = np.random.default_rng(9)
    real = rng.normal(size=(40, 2))
    fake = rng.normal(size=(33, 2)) * 0.7 + np.array([1.2, 0.0])  # narrower and shifted
    got = precision_recall(real.astype(np.float32), fake.astype(np.float32), k=3, block=block)
    expected = _brute_force_pr(real, fake, 3)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # the case is not degenerate


def test_manifold_radii_are_kth_neighbour_distances():
    x = np.random.default_rng(10).normal(size=(25, 5))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    for k in (1, 3, 5):
        got = manifold_radii(x.astype(np.float32), k=k, block=4).numpy()
        np.testing.assert_allclose(got, np.sort(d2, axis=1)[:, k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least 4 samples"):
        manifold_radii(x[:3], k=3)

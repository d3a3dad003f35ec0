"""Sample-quality metrics with the definitions of ADM's evaluator (Dhariwal & Nichol 2021, `evaluations/evaluator.py`).

Every function here works on features already extracted (Inception pool3, its spatial map, its logits, or a
domain classifier's features); nothing here knows which network produced them.

- `compute_statistics` and `frechet_distance`: FID and sFID (Heusel et al. 2017), in float64 as ADM.
- `inception_score`: Salimans et al. 2016, mean over splits of exp(E_x KL(p(y|x) || p(y))), as ADM.
- `precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019) with ADM's k = 3 manifolds.

Deviations from ADM's numerics, each smaller than the sampling noise of a 50K-sample metric:
- ADM computes pairwise distances in float16 (falling back to float32 when a block overflows); here they are
  float32, so a sample exactly on a radius may be classified differently.
- ADM's IS takes `log` of a float32 softmax (0·log 0 gives NaN); here it is a float64 log-softmax of the logits,
  with 0·log 0 = 0 when probabilities are given.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import torch
from scipy import linalg

log = logging.getLogger(__name__)

# ADM's `ManifoldEstimator` defaults: neighbourhood size 3, blocks of 10 000 rows and columns.
PR_NEIGHBOURS = 3
PR_BLOCK = 10_000
# ADM's `compute_inception_score` default: IS over splits of 5 000 samples, averaged.
IS_SPLIT_SIZE = 5_000


def compute_statistics(features: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of `features: (N, D)` -> (mu (D,), sigma (D, D)), both float64.

    Equal to ADM's `np.mean(x, 0), np.cov(x, rowvar=False)` (up to float64 rounding), computed in row chunks so
    50K x 2048 float32 features never get a full float64 copy.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    n, d = features.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    total = np.zeros(d, dtype=np.float64)
    for i in range(0, n, chunk):
        total += features[i : i + chunk].sum(axis=0, dtype=np.float64)
    mu = total / n
    scatter = np.zeros((d, d), dtype=np.float64)
    for i in range(0, n, chunk):
        centred = features[i : i + chunk].astype(np.float64) - mu
        scatter += centred.T @ centred
    return mu, scatter / (n - 1)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    matrix_sqrt: Literal["sqrtm", "eigh"] = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)

    `mu: (D,)`, `sigma: (D, D)`, all in float64.

    `matrix_sqrt="sqrtm"` (default) is ADM's computation (after TTUR's `fid.py`): `scipy.linalg.sqrtm` of the
    product; if that is not finite (near-singular product), `eps·I` is added to both covariances and it is
    retried; a result whose diagonal has an imaginary part above 1e-3 is an error, a smaller one is dropped.
    It takes tens of seconds for D = 2048 on a small CPU.

    `matrix_sqrt="eigh"` computes the same trace as Σ √λ of sigma1^½ sigma2 sigma1^½ (symmetric, PSD; same eigenvalues
    as sigma1 sigma2), with eigenvalues rounded below 0 clipped to 0: ~10x faster, agreeing with "sqrtm" to ~1e-9
    relative on valid statistics (tested), but not ADM's code path — report which one produced a number.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances must both be {(mu1.shape[0],) * 2}, got {sigma1.shape} and {sigma2.shape}")
    if matrix_sqrt not in ("sqrtm", "eigh"):
        raise ValueError(f"matrix_sqrt must be 'sqrtm' (ADM) or 'eigh', got {matrix_sqrt!r}")
    diff = mu1 - mu2
    if matrix_sqrt == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr sqrtm(sigma1 sigma2) exactly as ADM's `FIDStatistics.frechet_distance`."""
    with warnings.catch_warnings():
        # Covariances of fewer samples than feature dimensions are singular: scipy warns, the result is
        # still checked below (finite, real diagonal), as ADM does.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular product of covariances; adding %g to their diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has an imaginary component of {np.abs(covmean.imag).max():.3g} on its "
                "diagonal (> 1e-3): the covariances are not valid (non-PSD or non-finite) statistics"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 sigma2) = Σ √λ(sigma1^½ sigma2 sigma1^½), via two symmetric eigendecompositions."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sigma1^½
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def inception_score(
    logits_or_probs: np.ndarray,
    split_size: int = IS_SPLIT_SIZE,
    kind: Literal["auto", "logits", "probs"] = "auto",
) -> float:
    """Inception Score of `logits_or_probs: (N, C)` as ADM: mean over consecutive splits of `split_size` rows
    of exp(mean_x KL(p(y|x) || mean_x p(y|x))).

    `kind='auto'` treats rows that are non-negative, at most 1 and sum to 1 as probabilities, anything else as
    logits (softmax taken here). For Inception, ADM's probabilities are the softmax over the 1008 *bias-free*
    logits (pool3 @ W), which is `InceptionFeatures`' `logits` output.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected (N, C) logits or probabilities with N > 0, got shape {x.shape}")
    if kind not in ("auto", "logits", "probs"):
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    is_probs = kind == "probs" or (kind == "auto" and _looks_like_probs(x))
    scores = []
    for i in range(0, len(x), split_size):
        part = x[i : i + split_size]  # (n, C)
        if is_probs:
            p = part
            log_p = np.log(np.where(p > 0, p, 1.0))  # 0 · log 0 = 0
        else:
            log_p = part - part.max(axis=1, keepdims=True)
            log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
            p = np.exp(log_p)
        marginal = p.mean(axis=0, keepdims=True)  # (1, C) = p(y) over this split
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
        kl = (p * (log_p - log_marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances `(n, D), (m, D) -> (n, m)` as ADM: |u|² - 2 u·v + |v|², clamped at 0."""
    uu = u.pow(2).sum(1, keepdim=True)  # (n, 1)
    vv = v.pow(2).sum(1).unsqueeze(0)  # (1, m)
    return (uu - 2.0 * (u @ v.T) + vv).clamp_min_(0.0)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t


def manifold_radii(
    features: np.ndarray | torch.Tensor, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK, device: str = "cpu"
) -> torch.Tensor:
    """Squared distance of each row of `features: (N, D)` to its k-th nearest neighbour in the same set -> (N,).

    The point itself counts as neighbour 0, so this is the (k+1)-th smallest distance, as ADM's
    `ManifoldEstimator.manifold_radii`. Computed in row x column blocks keeping a running k+1 smallest, so the
    memory is O(block²) instead of O(block · N).
    """
    feats = _as_tensor(features)
    n = len(feats)
    if n < k + 1:
        raise ValueError(f"k={k} nearest neighbours need at least {k + 1} samples, got {n}")
    radii = torch.empty(n, dtype=torch.float32)
    for r0 in range(0, n, block):
        rows = feats[r0 : r0 + block].to(device, torch.float32)
        best = torch.full((len(rows), 0), float("inf"), device=device)  # (b, <= k+1) smallest so far
        for c0 in range(0, n, block):
            cols = feats[c0 : c0 + block].to(device, torch.float32)
            d = torch.cat([best, _sq_distances(rows, cols)], dim=1)
            best = torch.topk(d, k=min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + len(rows)] = best[:, k].cpu()
    return radii


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = PR_NEIGHBOURS,
    block: int = PR_BLOCK,
    device: str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's `compute_prec_recall`.

    `real_features: (N1, D)`, `fake_features: (N2, D)`. Each set's manifold is the union of balls around its
    points with radius = distance to the point's k-th nearest neighbour (`manifold_radii`). Precision is the
    fraction of fake samples inside the real manifold (distance to some real point <= that point's radius);
    recall is the fraction of real samples inside the fake manifold. Distances are compared squared, as ADM.
    """
    real, fake = _as_tensor(real_features), _as_tensor(fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    real_radii = manifold_radii(real, k, block, device)  # (N1,)
    fake_radii = manifold_radii(fake, k, block, device)  # (N2,)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool)
    for r0 in range(0, len(real), block):
        rows = real[r0 : r0 + block].to(device, torch.float32)
        rows_radii = real_radii[r0 : r0 + block].to(device)
        for c0 in range(0, len(fake), block):
            cols = fake[c0 : c0 + block].to(device, torch.float32)
            d = _sq_distances(rows, cols)  # (b_real, b_fake)
            # a real row is covered if it lies in the ball of some fake column, and vice versa
            real_in_fake[r0 : r0 + len(rows)] |= (d <= fake_radii[c0 : c0 + len(cols)].to(device)).any(1).cpu()
            fake_in_real[c0 : c0 + len(cols)] |= (d <= rows_radii[:, None]).any(0).cpu()
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())

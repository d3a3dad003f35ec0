"""Hand-made baselines of the switch and metric tables (not the official code, and labelled as such in the tables).

The training and sampling tables compare with the official implementations instead (official.py); the naive
MAE/DiT re-implementations that used to stand in for them were slower than the official code and borrowed usp's
fused AdamW, so their ratios flattered usp, and they are gone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def explicit_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """usp's Attention with softmax(QKᵀ/√d)V spelt out instead of scaled_dot_product_attention."""
    n, length, dim = x.shape
    qkv = attn.qkv(x).reshape(n, length, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.proj((probs @ v).transpose(1, 2).reshape(n, length, dim))


def inception_score(logits: np.ndarray, split_size: int) -> float:
    """IS of (N, C) logits: mean over splits of exp(E KL(p(y|x) ‖ p(y))), with torch's float64 softmax."""
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = torch.log_softmax(torch.from_numpy(logits[i : i + split_size]).double(), dim=1)
        p = log_p.exp()
        kl = (p * (log_p - p.mean(0, keepdim=True).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))


def frechet_from_eigenvalues(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance with tr((Σ1 Σ2)^½) = Σ √λ(Lᵀ Σ2 L), Σ1 = L Lᵀ: Σ1 Σ2 and the symmetric Lᵀ Σ2 L share
    their eigenvalues, so one Cholesky factor and one eigenvalue-only symmetric solve replace sqrtm (and the
    eigenvector solve that forming Σ1^½ needs). Exact for positive-definite Σ1."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    chol = np.linalg.cholesky(s1)
    inner = chol.T @ s2 @ chol
    eigenvalues = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eigenvalues).sum())

"""Quick read-outs of frozen features: top-k accuracy, logistic regression and weighted k-NN.

These are NOT the paper's linear probe (that is `usp probe`, a BatchNorm + linear head trained with LARS);
they take minutes instead of 90 epochs, for sweeps, the demo and regression tests. Accuracies are
percentages in [0, 100], as MAE reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits: (N, C) scores, labels: (N,) -> {"top{k}": % of rows whose label is among the k best}.

    k larger than C counts every row as correct (as top-5 over fewer than 5 classes is trivial)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    best = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, kmax), best first
    hits = best == labels.reshape(-1, 1).to(best.device)  # (N, kmax), at most one True per row
    # Count in integers so 842 of 1000 reads 84.2, not 84.19999.
    return {f"top{k}": hits[:, :k].any(dim=1).sum().item() * 100.0 / len(labels) for k in ks}


def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics of the training split only; constant features (e.g. always-black pixels) stay 0, not NaN.
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def logistic_regression(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 1.0,
    weight_decay: float = 1e-3,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Multinomial logistic regression on standardised frozen features (NOT the paper's linear probe).

    Full-batch L-BFGS with a strong-Wolfe line search for `epochs` iterations (each one or a few passes
    over the training set), from a zero initialisation, so the result is deterministic without a seed.
    Loss: mean cross-entropy + weight_decay/2 · ‖W‖² (bias not decayed). Features: (N, D); labels (N,).
    Returns {"top1", "top5"} on the test split, in %. Train and test tensors must share a device.

    The defaults (30 iterations, weight_decay 1e-3) give 84.3% top-1 on raw Fashion-MNIST pixels
    (60k × 784: 34 full-batch loss evaluations, ~22 CPU-seconds; 20 iterations give 83.5%).
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"need (N, D) features with the same D, got {tuple(train_x.shape)}, {tuple(test_x.shape)}")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = _standardise(train_x.float(), test_x.float())
    train_y = train_y.long().to(train_x.device)
    weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=lr,
        max_iter=epochs,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)  # one call runs up to `epochs` L-BFGS iterations
    with torch.no_grad():
        return topk_accuracy(test_x @ weight + bias, test_y)


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted k-nearest-neighbour classifier on cosine similarity, as DINO evaluates (NOT the paper's
    protocol): each of the k nearest training features votes for its label with weight exp(sim / T).
    Features: (N, D); labels (N,). Returns {"top1", "top5"} on the test split, in %.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_x.shape[0])
    train_x = F.normalize(train_x.float(), dim=1)
    train_y = train_y.long().to(train_x.device)
    scores = []
    for start in range(0, test_x.shape[0], chunk):  # bounds memory at chunk × N similarities
        query = F.normalize(test_x[start : start + chunk].float().to(train_x.device), dim=1)
        sim, idx = (query @ train_x.T).topk(k, dim=1)  # (B, k) cosine similarities, neighbour indices
        votes = torch.zeros(query.shape[0], num_classes, device=train_x.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())  # (B, C) summed weights per class
        scores.append(votes)
    return topk_accuracy(torch.cat(scores), test_y.long().to(train_x.device))


def fast_protocol(features: dict | str, train_images: int, init: str | None) -> dict:
    """The protocol card of a frozen-feature read-out (`fast_probe`, backbone probes, raw pixels)."""
    return {"name": "fast read-out (NOT the paper's linear probe)", "init": init or "random",
            "features": features,
            "classifier": "logistic regression on standardised features (L-BFGS, 30 iterations, weight decay 1e-3);"
                          " k-NN (k 20, cosine, temperature 0.07)",
            "augmentation": "none (features computed once, unflipped, posterior mean)",
            "schedule": "full batch, 30 L-BFGS iterations", "train_images": train_images}

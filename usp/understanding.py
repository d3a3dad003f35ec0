"""Understanding helpers: the linear-probe head, Mixup/CutMix with its loss, and quick frozen-feature probes.

Paper protocol (USP follows MAE): linear probe = frozen encoder + BatchNorm (no affine) + linear head
trained with LARS; full fine-tune = all weights, AdamW with layer-wise lr decay, RandAugment, Mixup 0.8,
CutMix 1.0, label smoothing 0.1 (MAE Tables 9 and 10). `LinearProbeHead`, `prepare_linear_probe`,
`set_probe_train_mode` and `build_mixup` serve that protocol.

`logistic_regression` and `knn_accuracy` are NOT the paper's protocol: they are quick read-outs of
frozen features (minutes instead of 90 epochs) for sweeps, the demo and regression tests. Do not
report their numbers as linear-probe accuracy.

Accuracies are percentages in [0, 100], as MAE reports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from usp.models.vit import VisionTransformer

# --------------------------------------------------------------------------------------------
# Linear probe (paper protocol)
# --------------------------------------------------------------------------------------------


class LinearProbeHead(nn.Sequential):
    """BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear(dim, num_classes): keys `0.running_mean`, `1.weight`.

    The parameter-free BN whitens the frozen features so one LARS lr fits every encoder (MAE, Sec. A.2);
    the linear layer starts at trunc-normal std 0.01 and zero bias (MoCo v3's probe init).
    """

    def __init__(self, dim: int, num_classes: int):
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def _feature_dim(model: VisionTransformer) -> int:
    if isinstance(model.head, nn.Linear):
        return model.head.in_features
    final_norm = model.fc_norm if model.global_pool else model.norm
    return final_norm.normalized_shape[0]


def prepare_linear_probe(model: VisionTransformer, num_classes: int) -> None:
    """Put a fresh `LinearProbeHead` on `model` and freeze everything else, in place.

    The probe reads `forward_features`: with global_pool=False the cls token after `norm` (MAE's linear-probe
    default), with global_pool=True the patch-token mean after `fc_norm`. Note that MAE's global-pool probe
    loads no `fc_norm` from the checkpoint (it is freshly initialised, then frozen); whichever norm the
    transfer loaded is what gets frozen here. Train with `set_probe_train_mode(model)`, not `model.train()`.
    """
    dim = _feature_dim(model)
    for param in model.parameters():
        param.requires_grad_(False)
    model.head = LinearProbeHead(dim, num_classes).to(model.cls_token.device)  # new params: trainable


def set_probe_train_mode(model: VisionTransformer) -> VisionTransformer:
    """Encoder in eval mode (no drop-path, no stat updates), only the probe head in train mode (its BN
    collects running statistics). Call after `prepare_linear_probe` instead of `model.train()`."""
    model.eval()
    model.head.train()
    return model


# --------------------------------------------------------------------------------------------
# Fine-tuning augmentation and loss (paper protocol)
# --------------------------------------------------------------------------------------------


def build_mixup(
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    label_smoothing: float = 0.1,
    num_classes: int,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
) -> tuple[Mixup | None, nn.Module]:
    """timm's Mixup/CutMix (None when both alphas are 0) and the loss that matches its targets.

    Defaults are MAE's fine-tuning recipe. With Mixup the label smoothing is folded into the soft targets,
    so the loss is SoftTargetCrossEntropy; without it, LabelSmoothingCrossEntropy (smoothing > 0) or plain
    cross-entropy.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= label_smoothing < 1:
        raise ValueError(
            f"need mixup_alpha >= 0, cutmix_alpha >= 0 and 0 <= label_smoothing < 1; got "
            f"{mixup_alpha}, {cutmix_alpha}, {label_smoothing}"
        )
    if mixup_alpha > 0 or cutmix_alpha > 0:
        mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return None, nn.CrossEntropyLoss()


# --------------------------------------------------------------------------------------------
# Quick frozen-feature read-outs (NOT the paper's protocol)
# --------------------------------------------------------------------------------------------


# no_grad rather than inference_mode: inference tensors could not be saved for backward by a later probe.
@torch.no_grad()
def extract_features(
    encoder_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encoder_fn` over (x, y) batches -> (features (N, D) float32 on CPU, labels (N,) int64 on CPU).

    `encoder_fn` is e.g. `model.forward_features` of a model already in eval mode; x is moved to `device`
    first when given.
    """
    feats, labels = [], []
    for x, y in batches:
        if device is not None:
            x = x.to(device, non_blocking=True)
        feats.append(encoder_fn(x).float().flatten(1).cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        raise ValueError("extract_features got no batches")
    return torch.cat(feats), torch.cat(labels)


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


# --------------------------------------------------------------------------------------------
# `usp probe --fast`: frozen features once, then logistic regression and k-NN (NOT the paper's protocol)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_split(model: VisionTransformer, data, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features (N, D) and labels of every item of a `LatentData` split (no augmentation)."""
    model.eval()
    features, labels = [], []
    for batch in data.eval_batches(list(range(len(data.dataset))), batch_size):
        features.append(model.forward_features(data.latents(batch)))
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


def fast_probe(config) -> dict[str, float | str]:
    """Logistic regression and k-NN on frozen encoder features of the recipe's train / eval splits."""
    import time

    from usp.train.tasks import LatentData, build_classifier

    start = time.perf_counter()
    torch.manual_seed(config.run.seed)
    train_data = LatentData(config, config.data.split, augment=False)
    test_data = LatentData(config, config.data.eval_split, augment=False)
    model = build_classifier(config, train_data.latent_size, train_data.spec.channels)
    train_x, train_y = encode_split(model, train_data)
    test_x, test_y = encode_split(model, test_data)
    logistic = logistic_regression(train_x, train_y, test_x, test_y)
    knn = knn_accuracy(train_x, train_y, test_x, test_y)
    return {"logistic_top1": logistic["top1"], "logistic_top5": logistic["top5"], "knn_top1": knn["top1"],
            "seconds": time.perf_counter() - start, "protocol": "fast (not the paper's linear probe)"}

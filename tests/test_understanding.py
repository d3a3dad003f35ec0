"""Values of the understanding helpers: frozen linear probe, Mixup targets, quick frozen-feature probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from usp.evaluate.probes import knn_accuracy, logistic_regression, topk_accuracy
from usp.models.vit import VisionTransformer
from usp.train.optim import LARS, build_optimizer, param_groups
from usp.train.tasks.classification import LinearProbeHead, build_mixup, prepare_linear_probe, set_probe_train_mode


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(
        latent_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=1000, **kwargs
    )


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def test_probe_head_layout_and_init():
    torch.manual_seed(0)
    model = tiny_vit(global_pool=False)
    prepare_linear_probe(model, num_classes=10)
    keys = set(model.state_dict())
    assert {
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
        "head.1.weight",
        "head.1.bias",
    } <= keys
    assert not any(k.startswith("head.0.weight") or k.startswith("head.0.bias") for k in keys)  # affine=False
    assert isinstance(model.head, LinearProbeHead) and model.head[0].eps == 1e-6
    assert model.head[1].weight.shape == (10, 32)
    assert torch.count_nonzero(model.head[1].bias) == 0
    assert 0.007 < model.head[1].weight.std().item() < 0.013  # trunc-normal std 0.01 over 320 draws
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]


@pytest.mark.parametrize("global_pool", [True, False])
def test_linear_probe_changes_only_the_head(global_pool):
    torch.manual_seed(0)
    # drop_path > 0 so that an encoder left in train mode would be visibly stochastic.
    model = tiny_vit(global_pool=global_pool, drop_path_rate=0.2)
    prepare_linear_probe(model, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer("lars", param_groups(model, 0.0), lr=0.1)
    assert isinstance(opt, LARS)
    x, y = torch.randn(16, 4, 8, 8), torch.randint(0, 5, (16,))
    set_probe_train_mode(model)
    assert model.head.training and not model.training and not model.blocks[0].drop_path.training
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x), features, rtol=0, atol=0)  # no drop-path
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if not key.startswith("head."):
            assert torch.equal(after[key], value), f"frozen {key} changed"
    assert not torch.equal(after["head.1.weight"], before["head.1.weight"])
    assert not torch.equal(after["head.1.bias"], before["head.1.bias"])
    assert after["head.0.num_batches_tracked"].item() == 4
    # The BN saw the same batch 4 times: running_mean = (1 − 0.9⁴)·batch mean, starting from 0.
    torch.testing.assert_close(after["head.0.running_mean"], (1 - 0.9**4) * features.mean(0), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


# --------------------------------------------------------------------------------------------
# Mixup / CutMix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_targets_match_mixing_coefficient(mixup_alpha, cutmix_alpha, smoothing):
    num_classes, n = 10, 8
    mixup, criterion = build_mixup(
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=smoothing, num_classes=num_classes
    )
    assert isinstance(criterion, SoftTargetCrossEntropy)
    np.random.seed(3)  # timm draws lam and the box with numpy
    values = torch.arange(1.0, n + 1)  # sample i is the constant image values[i]
    x = values.view(n, 1, 1, 1).expand(n, 3, 16, 16).clone()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    x_mix, target = mixup(x, y)
    assert target.shape == (n, num_classes)
    torch.testing.assert_close(target.sum(1), torch.ones(n))
    # Batch mode mixes sample i with sample n−1−i; for mixup and (area-corrected) cutmix alike the pixel
    # mean is lam·v_i + (1 − lam)·v_j, which recovers lam.
    lam = ((x_mix[0].mean() - values[-1]) / (values[0] - values[-1])).item()
    off = smoothing / num_classes
    on = 1 - smoothing + off
    for i in range(n):
        j = n - 1 - i
        assert target[i, y[i]].item() == pytest.approx(lam * on + (1 - lam) * off, abs=1e-5)
        assert target[i, y[j]].item() == pytest.approx((1 - lam) * on + lam * off, abs=1e-5)
        others = [c for c in range(num_classes) if c not in (y[i], y[j])]
        torch.testing.assert_close(target[i, others], torch.full((len(others),), off))
        assert x_mix[i].mean().item() == pytest.approx(lam * values[i].item() + (1 - lam) * values[j].item(), abs=1e-4)
    assert 0.0 < lam < 1.0


def test_mixup_off_selects_plain_losses():
    mixup, criterion = build_mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
    assert mixup is None and isinstance(criterion, LabelSmoothingCrossEntropy)
    mixup, criterion = build_mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10)
    assert mixup is None and isinstance(criterion, nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_mixup(label_smoothing=1.0, num_classes=10)


# --------------------------------------------------------------------------------------------
# Quick frozen-feature read-outs
# --------------------------------------------------------------------------------------------


def test_topk_accuracy_hand_case():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 1
            [0.1, 0.2, 0.3, 0.4],  # label 2: rank 2
            [0.4, 0.3, 0.2, 0.1],  # label 3: rank 4
            [0.0, 1.0, 0.5, 0.2],  # label 1: rank 1
        ]
    )
    labels = torch.tensor([0, 2, 3, 1])
    assert topk_accuracy(logits, labels, ks=(1, 2, 3, 5)) == {"top1": 50.0, "top2": 75.0, "top3": 75.0, "top5": 100.0}


def test_logistic_regression_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 4, 16
    directions = torch.randn(num_classes, dim, generator=g) * 3
    train_y, test_y = torch.arange(400) % num_classes, torch.arange(200) % num_classes
    train_x = directions[train_y] + 0.3 * torch.randn(400, dim, generator=g)
    test_x = directions[test_y] + 0.3 * torch.randn(200, dim, generator=g)
    result = logistic_regression(train_x, train_y, test_x, test_y, epochs=20)
    assert result == {"top1": 100.0, "top5": 100.0}
    assert logistic_regression(train_x, train_y, test_x, test_y, epochs=20) == result  # deterministic


def test_knn_recovers_cluster_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6, 32) * 5  # orthogonal directions: cosine similarity separates them
    train_y, test_y = torch.arange(120) % 6, torch.arange(60) % 6
    train_x = centres[train_y] + 0.2 * torch.randn(120, 32, generator=g)
    test_x = centres[test_y] + 0.2 * torch.randn(60, 32, generator=g)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20, chunk=7)["top1"] == 100.0


def test_knn_weights_votes_by_similarity():
    # One very close neighbour of class 1 outvotes two distant ones of class 0 at a low temperature.
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_x = torch.tensor([[1.0, 0.1]])
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([1]), k=3, temperature=0.07)["top1"] == 100.0
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0]), k=3, temperature=100.0)["top1"] == 100.0

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
    # The BN saw the same batch 4 times and keeps a cumulative average: the running statistics are exactly the
    # batch's (an exponential average would still hold 0.9⁴ of BN's initial mean 0 and variance 1).
    torch.testing.assert_close(after["head.0.running_mean"], features.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["head.0.running_var"], features.var(0), rtol=1e-4, atol=1e-6)
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


# --------------------------------------------------------------------------------------------
# The LARS probe learns at every scale
# --------------------------------------------------------------------------------------------


def _separable(n_train: int, n_test: int, dim: int = 64, classes: int = 10):
    """Linearly separable train/test features: class centres far apart along random directions, off-centre
    by 3 (as frozen features are), unit noise. Returns (train_x, train_y, test_x, test_y)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g) * 1.5 + 3.0
    splits = []
    for n in (n_train, n_test):
        labels = torch.arange(n) % classes
        splits += [centres[labels] + torch.randn(n, dim, generator=g), labels]
    return splits


def _train_probe_head(reference_images: int | None, train_x, train_y) -> LinearProbeHead:
    """The FMNIST probe recipe's optimiser (LARS, blr, batch, epochs, warm-up, schedule) and the task's own lr
    rule, on a BN + linear head over fixed features: everything the engine does for a probe but the encoder."""
    from usp.config import load_config
    from usp.train.optim import apply_lr, lr_at
    from usp.train.tasks.classification import lars_lr_scale

    config = load_config("configs/fmnist/probe.yaml", [f"classify.lars_reference_images={reference_images or 'null'}",
                                                       "train.global_batch=256"])
    torch.manual_seed(0)
    head = LinearProbeHead(train_x.shape[1], 10)
    groups = param_groups(head, config.optim.weight_decay)
    scale = lars_lr_scale(config, len(train_x))
    for group in groups:
        if all(p.ndim > 1 for p in group["params"]):
            group["lr_scale"] *= scale
    opt = build_optimizer("lars", groups, lr=config.lr, momentum=config.optim.momentum)
    batch = config.train.global_batch
    steps_per_epoch = len(train_x) // batch
    total = int(config.train.epochs * steps_per_epoch)
    warmup = round(config.optim.warmup_epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(1)
    order = torch.cat([torch.randperm(len(train_x), generator=g) for _ in range(int(config.train.epochs) + 1)])
    head.train()
    for step in range(total):
        apply_lr(opt, lr_at(step, base_lr=config.lr, warmup_steps=warmup, total_steps=total))
        idx = order[step * batch : (step + 1) * batch]
        loss = nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def test_lars_probe_recipe_separates_separable_features():
    """The recipe's LARS probe reaches >= 99 % on a linearly separable set of 5 000 (logistic regression: 100 %).
    Without the task's lr rule (the paper's blr × batch / 256 alone) the same run leaves the head near its
    std-0.01 init: LARS steps are a fixed fraction of ‖w‖, so the travel scales with the dataset size."""
    train_x, train_y, test_x, test_y = _separable(5000, 2000)
    assert logistic_regression(train_x, train_y, test_x, test_y)["top1"] == 100.0
    head = _train_probe_head(1_281_167, train_x, train_y)
    stuck = _train_probe_head(None, train_x, train_y)
    with torch.no_grad():
        assert topk_accuracy(head(test_x), test_y)["top1"] >= 99.0
        assert topk_accuracy(stuck(test_x), test_y)["top1"] < 60.0
        assert stuck[1].weight.norm() < 1.2 * 0.01 * (640**0.5)  # still about its initial norm


def test_lars_travel_and_lr_scale():
    from usp.config import load_config
    from usp.train.optim import lars_travel
    from usp.train.tasks.classification import lars_lr_scale

    assert lars_travel([0.5] * 100, momentum=0.9, trust_coefficient=0.001) == pytest.approx(0.5)
    config = load_config("configs/probe/vit_b_2_sdvae_224.yaml")
    assert lars_lr_scale(config, 1_281_167) == 1.0  # the paper's own setting is unchanged
    assert lars_lr_scale(config, 60_000) == pytest.approx(21.35, abs=0.01)
    config.classify.lars_reference_images = None
    assert lars_lr_scale(config, 60_000) == 1.0


# --------------------------------------------------------------------------------------------
# RandAugment with the installed Pillow
# --------------------------------------------------------------------------------------------


def test_posterize_keeps_zero_bits_as_black_and_randaugment_runs():
    from PIL import Image

    from usp.config import load_config
    from usp.train.tasks.classification import _posterize, build_classify_transform

    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    assert np.asarray(_posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize(image, 8)), np.asarray(image))
    assert np.array_equal(np.asarray(_posterize(image, 4)), np.asarray(image) & 0xF0)
    config = load_config(None, ["data.image_size=32", "classify.randaug=rand-m10-n4-mstd0.5-inc1",
                                "classify.random_erasing=0.25"])
    transform = build_classify_transform(config)
    from timm.data.auto_augment import RandAugment

    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is _posterize for op in posterize)
    posterize[0].prob, posterize[0].magnitude_std = 1.0, 0.0
    assert np.asarray(posterize[0](image)).max() == 0  # magnitude 10 keeps 0 bits
    torch.manual_seed(0)
    for _ in range(40):  # the whole transform, magnitudes up to 10 (raised "bits must be ..." before)
        assert transform(image).shape == (3, 32, 32)

"""Classification on latents: the paper's linear probe and full fine-tuning of a ViT from USP weights,
and the quick frozen-feature read-out (`usp probe --fast`).

Paper protocol (USP follows MAE): linear probe = frozen encoder + BatchNorm (no affine) + linear head
trained with LARS; full fine-tune = all weights, AdamW with layer-wise lr decay, RandAugment, Mixup 0.8,
CutMix 1.0, label smoothing 0.1 (MAE Tables 9 and 10). `fast_probe` is NOT that protocol: logistic
regression and k-NN on frozen features (`usp.evaluate.probes`), for sweeps, the demo and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from usp.config import Config
from usp.evaluate.probes import knn_accuracy, logistic_regression
from usp.latent.data import LatentData
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


def build_classifier(config: Config, latent_size: int, channels: int) -> nn.Module:
    """The registered ViT classifier of model.name (`vit_b_2` or `vit_b_2_cls`), USP weights transferred."""
    from usp.models import classifier_for, create_model
    from usp.models.transfer import load_state_dict_file, transfer_weights

    model = create_model(classifier_for(config.model.name), latent_size=latent_size, in_channels=channels,
                         num_classes=config.model.num_classes, global_pool=config.model.global_pool,
                         drop_path_rate=config.model.drop_path)
    if config.model.init:
        report = transfer_weights(load_state_dict_file(config.model.init), model, num_blocks=config.model.init_blocks,
                                  interpolation=config.model.pos_interpolation)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        report.save(config.run_dir / "transfer.json")
        if os.environ.get("RANK", "0") == "0":  # what the user's checkpoint gave, once per run
            print(report.summary(), flush=True)
    return model


class ClassifierTask:
    """ViT classification on latents: the linear probe (`usp probe`, frozen encoder, BN + linear head,
    LARS) or full fine-tuning (`usp classify`, layer-wise lr decay, mixup/cutmix, label smoothing)."""

    def __init__(self, config: Config):
        self.config, self.probe = config, config.run.task == "probe"
        cc, dc = config.classify, config.data
        transform = None
        if not self.probe and (cc.randaug or cc.random_erasing):
            from timm.data import create_transform

            from usp.data.images import IMAGENET_MEAN, IMAGENET_STD

            mean, std = ((0.5,) * 3, (0.5,) * 3) if dc.normalize == "half" else (IMAGENET_MEAN, IMAGENET_STD)
            transform = create_transform(dc.image_size, is_training=True, auto_augment=cc.randaug,
                                         re_prob=cc.random_erasing, interpolation="bicubic", mean=mean, std=std,
                                         scale=dc.crop_scale, hflip=0.5 if dc.hflip else 0.0)
        self.data = LatentData(config, config.data.split, augment=True, transform=transform)
        self.train_set = self.data.dataset
        self.model = build_classifier(config, self.data.latent_size, self.data.spec.channels)
        if self.probe:
            prepare_linear_probe(self.model, config.model.num_classes)
        self.mixup, self.criterion = build_mixup(mixup_alpha=cc.mixup, cutmix_alpha=cc.cutmix,
                                                 label_smoothing=cc.label_smoothing,
                                                 num_classes=config.model.num_classes)
        self._eval_data: LatentData | None = None

    def param_groups(self) -> list[dict]:
        from usp.train.optim import param_groups

        if self.config.optim.layer_decay is None:
            return param_groups(self.model, self.config.optim.weight_decay)
        return param_groups(self.model, self.config.optim.weight_decay, layer_decay=self.config.optim.layer_decay,
                            num_layers=self.model.num_layers)

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.probe:  # frozen encoder in eval mode; only the head's BatchNorm collects statistics
            set_probe_train_mode(model.module if hasattr(model, "module") else model)
        x, labels = self.data.latents(batch), batch["label"]
        if self.mixup is not None:
            x, targets = self.mixup(x, labels)
        else:
            targets = labels
        logits = model(x)
        return {"loss": self.criterion(logits, targets)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """Top-1 / top-5 on the evaluation split (centre crop, posterior mean), sharded across ranks."""
        import torch.distributed as dist

        if self._eval_data is None:
            self._eval_data = LatentData(self.config, self.config.data.eval_split, augment=False)
        data = self._eval_data
        device = next(model.parameters()).device
        model.eval()
        correct, total = torch.zeros(2, device=device), torch.zeros((), device=device)
        for batch in data.eval_batches(list(range(runtime.rank, len(data.dataset), runtime.world_size)), 256, device):
            logits = model(data.latents(batch))
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch["label"].view(-1, 1)
            correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
            total += len(hits)
        if runtime.world_size > 1:
            dist.all_reduce(correct)
            dist.all_reduce(total)
        return {"top1": 100 * correct[0].item() / total.item(), "top5": 100 * correct[1].item() / total.item()}



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

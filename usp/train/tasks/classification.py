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
from usp.evaluate.probes import fast_protocol, knn_accuracy, logistic_regression
from usp.latent.data import LatentData
from usp.models.vit import VisionTransformer
from usp.train.tasks.probe_features import HeadOnFeatures, feature_dataset, probe_on_features

# --------------------------------------------------------------------------------------------
# Linear probe (paper protocol)
# --------------------------------------------------------------------------------------------


class LinearProbeHead(nn.Sequential):
    """BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear(dim, num_classes): keys `0.running_mean`, `1.weight`.

    The parameter-free BN whitens the frozen features so one LARS lr fits every encoder (MAE, Sec. A.2);
    the linear layer starts at trunc-normal std 0.01 and zero bias (MoCo v3's probe init). The BN keeps a
    cumulative average (momentum None), not an exponential one: the encoder is frozen, so its feature
    statistics never drift, and after k steps the running estimate is the mean over all k batches instead of
    0.9^k of BN's initial (0, 1) — on a short probe that initial value would skew every evaluation.
    """

    def __init__(self, dim: int, num_classes: int):
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None), linear)


def _feature_dim(model: VisionTransformer) -> int:
    if isinstance(model.head, nn.Linear):
        return model.head.in_features
    final_norm = model.fc_norm if model.global_pool else model.norm
    return final_norm.normalized_shape[0]


def feature_protocol(model: VisionTransformer) -> dict[str, str]:
    """Which features a classifier of `model` reads: layer, pooling, normalisation (for every probe result)."""
    depth = model.num_layers
    if model.global_pool:
        return {"layer": f"output of block {depth} of {depth} (last)", "pooling": "mean of patch tokens (no cls)",
                "norm": "after the final LayerNorm (fc_norm)"}
    return {"layer": f"output of block {depth} of {depth} (last)", "pooling": "cls token",
            "norm": "after the final LayerNorm (norm)"}


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


def _posterize(img, bits_to_keep: int, **_):
    """Posterize that accepts 0 bits: RandAugment's increasing posterize keeps 4 - ⌊4·m/10⌋ bits, i.e. 0 at
    magnitude 10 (reached by m9 with mstd 0.5), which Pillow ≥ 10 rejects ("bits must be between 1 and 8").
    Keeping 0 bits is a black image, what older Pillow returned for it."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def build_classify_transform(config: Config):
    """The fine-tuning image transform (MAE Table 10 / USP Table 13): RandomResizedCrop + flip, RandAugment,
    normalisation, random erasing, via timm; its posterize ops use `_posterize` (in this instance only)."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    from usp.data.images import IMAGENET_MEAN, IMAGENET_STD

    cc, dc = config.classify, config.data
    mean, std = ((0.5,) * 3, (0.5,) * 3) if dc.normalize == "half" else (IMAGENET_MEAN, IMAGENET_STD)
    transform = create_transform(dc.image_size, is_training=True, auto_augment=cc.randaug,
                                 re_prob=cc.random_erasing, interpolation="bicubic", mean=mean, std=std,
                                 scale=dc.crop_scale, hflip=0.5 if dc.hflip else 0.0)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


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
    from usp.models.transfer import transfer_weights
    from usp.run.weights import load_weights

    model = create_model(classifier_for(config.model.name), latent_size=latent_size, in_channels=channels,
                         num_classes=config.model.num_classes, global_pool=config.model.global_pool,
                         drop_path_rate=config.model.drop_path)
    if config.model.init:
        report = transfer_weights(load_weights(config.model.init)[0], model, num_blocks=config.model.init_blocks,
                                  interpolation=config.model.pos_interpolation)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        report.save(config.run_dir / "transfer.json")
        if os.environ.get("RANK", "0") == "0":  # what the user's checkpoint gave, once per run
            print(report.summary(), flush=True)
    return model


def lars_lr_scale(config: Config, num_images: int) -> float:
    """The LARS probe's weight-lr multiplier: classify.lars_reference_images / training images (1 otherwise).

    LARS moves a weight by lr·η·‖w‖ per step whatever its gradient, so with lr = blr·batch/256 a run moves
    the head by η·blr·epochs·images/256/(1 − momentum): the paper's blr 0.1 holds the travel of ImageNet
    epochs, and on 60 k images the same blr travels 21× less (see usp.train.optim.LARS). The multiplier
    restores the paper's travel per epoch; on ImageNet itself it is 1.
    """
    if config.optim.name != "lars" or not config.classify.lars_reference_images:
        return 1.0
    return config.classify.lars_reference_images / num_images


class ClassifierTask:
    """ViT classification on latents: the linear probe (`usp probe`, frozen encoder, BN + linear head,
    LARS) or full fine-tuning (`usp classify`, layer-wise lr decay, mixup/cutmix, label smoothing).

    At the end of the run `result.json` in the run folder holds top-1/top-5 and the protocol that gave them.
    """

    def __init__(self, config: Config):
        self.config, self.probe = config, config.run.task == "probe"
        cc = config.classify
        transform = None
        if not self.probe and (cc.randaug or cc.random_erasing):
            transform = build_classify_transform(config)
        self.data = LatentData(config, config.data.split, augment=True, transform=transform)
        self.train_set = self.data.dataset
        self.model = build_classifier(config, self.data.latent_size, self.data.spec.channels)
        self.vit = self.model  # the classifier itself (self.model wraps it when the probe reads features)
        self.on_features = False
        if self.probe:
            prepare_linear_probe(self.model, config.model.num_classes)
            self.on_features = probe_on_features(config, self.data)
        if self.on_features:  # frozen features once per image and orientation; the head trains on them
            orientations = 2 if self.data.flip else 1
            self.train_set = feature_dataset(config, self.vit, self.data, config.data.split, orientations)
            self.model = HeadOnFeatures(self.vit)
        self.mixup, self.criterion = build_mixup(mixup_alpha=cc.mixup, cutmix_alpha=cc.cutmix,
                                                 label_smoothing=cc.label_smoothing,
                                                 num_classes=config.model.num_classes)
        self.lr_scale = lars_lr_scale(config, len(self.train_set))
        if self.lr_scale != 1.0 and os.environ.get("RANK", "0") == "0":
            print(f"LARS: weight lr × {self.lr_scale:.3g} ({cc.lars_reference_images} reference / "
                  f"{len(self.train_set)} training images), so an epoch moves the head as far as a paper epoch; "
                  "classify.lars_reference_images=null keeps blr × batch / 256", flush=True)
        self._eval_data: LatentData | None = None

    def extras(self) -> dict:
        return self.data.extras()  # the flip coin of a cached latent, posterior noise

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The classifier's weights, with the same keys whether the probe read latents or features."""
        return (model.vit if isinstance(model, HeadOnFeatures) else model).state_dict()

    def param_groups(self) -> list[dict]:
        from usp.train.optim import param_groups

        if self.config.optim.layer_decay is None:
            groups = param_groups(self.model, self.config.optim.weight_decay)
        else:
            groups = param_groups(self.model, self.config.optim.weight_decay,
                                  layer_decay=self.config.optim.layer_decay, num_layers=self.model.num_layers)
        for group in groups:  # only LARS's trust-ratio (matrix) weights; biases keep the blr rule
            if all(p.ndim > 1 for p in group["params"]):
                group["lr_scale"] *= self.lr_scale
        return groups

    def protocol(self) -> dict:
        """What a result of this run means: features, classifier, augmentation, schedule."""
        config, cc, dc, oc = self.config, self.config.classify, self.config.data, self.config.optim
        if self.data.cached:
            augmentation = "horizontal flip of the cached latent (p 0.5)" if self.data.flip else "none"
            augmentation += " (cached latents: no crop)"
            if self.on_features:
                augmentation += "; frozen features computed once per image and orientation"
        else:
            augmentation = (f"RandomResizedCrop(scale {list(dc.crop_scale)})" if dc.crop == "random_resized"
                            else f"{dc.crop} crop") + (" + horizontal flip" if dc.hflip else "")
            if cc.randaug:
                augmentation += f" + RandAugment {cc.randaug}"
            if cc.random_erasing:
                augmentation += f" + random erasing {cc.random_erasing}"
        if cc.mixup or cc.cutmix:
            augmentation += f" + mixup {cc.mixup} / cutmix {cc.cutmix}"
        if self.probe:
            classifier = (f"BatchNorm1d(affine=False) + linear (init std 0.01), frozen encoder in eval mode; "
                          f"{oc.name.upper()} momentum {oc.momentum}, weight decay {oc.weight_decay}")
        else:
            classifier = (f"full fine-tuning, {oc.name} weight decay {oc.weight_decay}, layer decay {oc.layer_decay}"
                          f", drop path {config.model.drop_path}, label smoothing {cc.label_smoothing}")
        model = self.vit
        lr = config.lr * self.lr_scale
        return {"name": "linear probe (paper protocol, Table 12)" if self.probe
                else "full fine-tuning (paper protocol, Table 13)",
                "init": config.model.init or "random",
                "features": feature_protocol(model) if self.probe else "all weights trained",
                "classifier": classifier,
                "schedule": f"{config.train.epochs:g} epochs (max_steps {config.train.max_steps}), batch "
                            f"{config.train.global_batch}, peak lr {config.lr:.4g} (blr {oc.blr} × batch/256)"
                            + (f", weights × {self.lr_scale:.4g} = {lr:.4g}" if self.lr_scale != 1.0 else "")
                            + f", {oc.warmup_epochs:g} warm-up epochs, {oc.schedule}"
                            + (f"; at least {config.min_steps} steps (a shorter schedule is stretched at the same "
                               "summed lr)" if config.min_steps else ""),
                "augmentation": augmentation,
                "train_images": len(self.train_set)}

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if self.probe and (self.vit.training or not self.vit.head.training):  # after the engine's model.train()
            set_probe_train_mode(self.vit)  # frozen encoder in eval mode; only the head's BN collects statistics
        if self.on_features:  # (N, 2, D) or (N, 1, D): the orientation of the flip coin, as the latents pick it
            features = batch["features"]
            pick = batch["flip"].long().clamp(max=features.shape[1] - 1).view(-1, 1, 1).expand(-1, 1,
                                                                                               features.shape[2])
            return {"loss": self.criterion(model(features.gather(1, pick).squeeze(1)), batch["label"])}
        x, labels = self.data.latents(batch), batch["label"]
        if self.mixup is not None:
            x, targets = self.mixup(x, labels)
        else:
            targets = labels
        logits = model(x)
        return {"loss": self.criterion(logits, targets)}

    def _eval_batches(self, data, runtime, device):
        """This rank's share of the evaluation split, in batches of train.eval_batch."""
        indices = list(range(runtime.rank, len(data.dataset if not self.on_features else data), runtime.world_size))
        if not self.on_features:
            yield from data.eval_batches(indices, self.config.train.eval_batch, device)
            return
        for start in range(0, len(indices), self.config.train.eval_batch):
            items = [data[i] for i in indices[start : start + self.config.train.eval_batch]]
            yield {"features": torch.stack([torch.as_tensor(it["features"]) for it in items]).to(device),
                   "label": torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """Top-1 / top-5 on the evaluation split (centre crop, posterior mean), sharded across ranks; at the
        end also `result.json` (metrics + protocol), printed."""
        import json

        import torch.distributed as dist

        if self._eval_data is None:
            self._eval_data = LatentData(self.config, self.config.data.eval_split, augment=False)
            if self.on_features:  # the eval split's plain features, once
                self._eval_data = feature_dataset(self.config, model.vit, self._eval_data,
                                                  self.config.data.eval_split, 1)
        data = self._eval_data
        device = next(model.parameters()).device
        model.eval()
        correct, total = torch.zeros(2, device=device), torch.zeros((), device=device)
        for batch in self._eval_batches(data, runtime, device):
            logits = model(batch["features"][:, 0]) if self.on_features else model(data.latents(batch))
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch["label"].view(-1, 1)
            correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
            total += len(hits)
        if runtime.world_size > 1:
            dist.all_reduce(correct)
            dist.all_reduce(total)
        metrics = {"top1": 100 * correct[0].item() / total.item(), "top5": 100 * correct[1].item() / total.item()}
        if final and runtime.is_main:
            result = {**metrics, "step": step, "eval_images": int(total.item()), "protocol": self.protocol()}
            (run_dir / "result.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result, indent=1), flush=True)
        return metrics


# --------------------------------------------------------------------------------------------
# `usp probe --fast`: frozen features once, then logistic regression and k-NN (NOT the paper's protocol)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_split(model: VisionTransformer, data, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features (N, D) and labels of every item of a `LatentData` split (no augmentation)."""
    model.eval()
    features, labels = [], []
    for batch in data.eval_batches(list(range(len(data.dataset))), batch_size):
        features.append(model.forward_features(data.latents(batch)))
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


def fast_probe(config) -> dict:
    """Logistic regression and k-NN on frozen encoder features of the recipe's train / eval splits."""
    import time

    start = time.perf_counter()
    torch.manual_seed(config.run.seed)
    train_data = LatentData(config, config.data.split, augment=False)
    test_data = LatentData(config, config.data.eval_split, augment=False)
    model = build_classifier(config, train_data.latent_size, train_data.spec.channels)
    train_x, train_y = encode_split(model, train_data, config.train.eval_batch)
    test_x, test_y = encode_split(model, test_data, config.train.eval_batch)
    logistic = logistic_regression(train_x, train_y, test_x, test_y)
    knn = knn_accuracy(train_x, train_y, test_x, test_y)
    return {"logistic_top1": logistic["top1"], "logistic_top5": logistic["top5"], "knn_top1": knn["top1"],
            "seconds": time.perf_counter() - start,
            "protocol": fast_protocol(feature_protocol(model), len(train_y), config.model.init)}

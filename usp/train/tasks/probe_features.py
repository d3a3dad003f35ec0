"""The linear probe on cached latents at the speed of cached features.

A latent cache holds each image once, in two orientations, with no crop; the probe's encoder is frozen and in
eval mode. Its pooled features are then a fixed function of (image, orientation), so they are computed once —
(N, 2, D) [plain, flipped], in a float32 file of the run folder — and the LARS head trains on them: each step
picks an item's orientation by the same per-sample flip coin the per-step probe draws, and runs only
BatchNorm + linear. Same draws, same features (up to float rounding of batched matmuls), same head updates;
the encoder runs 2 passes over the data instead of one per epoch. With crops (images on the fly) or posterior
samples the features change every step, and the probe runs the encoder every step as the paper does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset

from usp.models.vit import VisionTransformer


class HeadOnFeatures(nn.Module):
    """The probe classifier whose forward takes frozen features (N, D) instead of latents: `vit.head(features)`.
    `vit` is the whole classifier, so its weights file has the per-step probe's keys (`export`)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vit.head(features)  # (N, num_classes)


class FeatureDataset(Dataset):
    """Items {"features": (2, D) float32 [plain, flipped], "label": int}, memory-mapped from `path`."""

    draws_python_random = False  # SeededDataset need not seed Python's and NumPy's generators for it

    def __init__(self, path: Path, labels: np.ndarray, dim: int, classes: list | None = None):
        self.path, self.labels, self.dim, self.classes = path, labels, dim, classes
        self._array = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:  # a DataLoader worker maps the file itself rather than receive a copy
        return {**self.__dict__, "_array": None}

    def __getitem__(self, index: int) -> dict:
        if self._array is None:  # opened lazily: each DataLoader worker maps the file itself
            # copy-on-write map: writable, so collation makes tensors of its rows without a copy or a warning
            self._array = np.load(self.path, mmap_mode="c").view(np.ndarray)  # rows without memmap overhead
        # a row view and an int: a step's items cost a microsecond each (collation stacks them)
        return {"features": self._array[index], "label": int(self.labels[index])}


def _device(config) -> torch.device:
    if config.run.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def extract_features(vit: VisionTransformer, data, path: Path, batch_size: int, orientations: int,
                     device: torch.device) -> FeatureDataset:
    """Pooled frozen features of every item of `data` (a cached `LatentData`) in `orientations` (1: plain,
    2: plain and flipped) into `path` (N, orientations, D). Under torch.distributed each rank encodes its share
    of the items into the one file, which rank 0 creates."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    count, dim = len(data.dataset), vit.head[1].in_features
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, orientations, dim)).flush()
    if world > 1:
        dist.barrier()
    array = np.load(path, mmap_mode="r+")
    was_training, was_device = vit.training, next(vit.parameters()).device
    vit.eval().to(device)
    mine = list(range(rank, count, world))
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        moments = torch.stack([data.dataset[i]["moments"] for i in indices]).to(device)  # (B, 2, 2C, h, w)
        for side in range(orientations):
            batch = {"moments": moments, "flip": torch.full((len(indices),), bool(side), device=device)}
            array[indices, side] = vit.forward_features(data.latents(batch)).float().cpu().numpy()  # (B, D)
    array.flush()
    if world > 1:
        dist.barrier()
    vit.train(was_training).to(was_device)
    labels = np.array([int(data.dataset[i]["label"]) for i in range(count)]) if count else np.zeros(0, np.int64)
    return FeatureDataset(path, labels, dim, getattr(data.dataset, "classes", None))


def probe_on_features(config, data) -> bool:
    """Whether the probe can train on features computed once: cached latents, posterior mean, no mixup."""
    return (config.run.task == "probe" and data.cached and not config.latent.sample_posterior
            and not (config.classify.mixup or config.classify.cutmix))


def feature_dataset(config, vit: VisionTransformer, data, split: str, orientations: int) -> FeatureDataset:
    """The features of `split` in the run folder (`probe_features/<split>.npy`), computed now."""
    path = config.run_dir / "probe_features" / f"{split}.npy"
    return extract_features(vit, data, path, extraction_batch(config), orientations, _device(config))


def extraction_batch(config) -> int:
    """Items per encoder call: the training micro-batch (the per-step probe runs the frozen encoder on that many
    without gradients, so it fits), or train.eval_batch if larger: small calls cost more per item (the demo's
    ViT-T/2 on 2 CPU cores: several times more at 64 than at 256)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return max(config.train.eval_batch, config.train.global_batch // world // config.train.accum_steps)

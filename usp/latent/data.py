"""The dataset every latent task reads: cached VAE moments or images encoded on the fly by the frozen VAE.

Cached: items carry moments (2, 2C, h, w) of the image and its flip, and the task picks one by a per-sample
coin (only when the split is augmented and `data.hflip` is true). On the fly: items carry images, which the
frozen VAE encodes on the training device.
"""

from __future__ import annotations

import torch

from usp.config import Config
from usp.data.images import build_image_dataset, build_transform
from usp.latent.cache import LatentCacheDataset
from usp.latent.vae import LatentSpace, moments_to_latents, scale_and_shift, spec_of


class LatentData:
    """The shared latent input path of every task on latents.

    Cached: items carry moments (2, 2C, h, w) and the task picks plain/flipped by a per-sample coin.
    On the fly: items carry images, which the frozen VAE encodes on the training device.
    """

    def __init__(self, config: Config, split: str, augment: bool, crop: str | None = None, transform=None):
        lc, dc = config.latent, config.data
        self.spec = spec_of(lc.space)
        self.latent_size = dc.image_size // self.spec.factor
        if dc.image_size % self.spec.factor:
            raise ValueError(f"data.image_size={dc.image_size} is not divisible by the {lc.space} VAE factor "
                             f"{self.spec.factor}; use {self.latent_size * self.spec.factor or self.spec.factor}")
        self.sample_posterior, self.augment = lc.sample_posterior, augment
        # The cached flipped copy is drawn only where the image path would flip: augmented splits with data.hflip.
        self.flip = augment and dc.hflip
        self.vae: LatentSpace | None = None
        if lc.cache:
            if transform is not None:
                raise ValueError("this recipe augments images (classify.randaug / random_erasing), which a latent "
                                 "cache cannot do: unset latent.cache to encode augmented images on the fly")
            self.dataset = LatentCacheDataset(lc.cache, split, lc.space, dc.image_size, dc.limit)
            self.scale, self.shift = scale_and_shift(lc.space, lc.path, lc.cache)
        else:
            transform = transform or build_transform(dc.image_size, crop or (dc.crop if augment else "center"),
                                                     dc.crop_scale, dc.hflip and augment, dc.normalize)
            self.dataset = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download, dc.exclude)
            self.vae = LatentSpace.load(lc.space, lc.path, precision=lc.vae_precision,
                                        channels_last=lc.vae_channels_last, max_batch=lc.vae_batch)
            self.scale, self.shift = self.vae.scale, self.vae.shift

    @property
    def cached(self) -> bool:
        return self.vae is None

    def extras(self) -> dict:
        """Per-sample randomness of the latent itself: the flip coin and the posterior noise."""
        out = {}
        if self.cached:
            # a Python bool (collated into a bool tensor): no tensor op per item, the same coin as `torch.rand(()) < .5`
            out["flip"] = torch.rand(()).item() < 0.5 if self.flip else False
        if self.sample_posterior:
            out["posterior_eps"] = torch.randn(self.spec.channels, self.latent_size, self.latent_size)
        return out

    def eval_batches(self, indices: list[int], batch_size: int, device: torch.device | str = "cpu"):
        """Unaugmented batches (plain, never flipped) of the given items, for evaluation and feature extraction."""
        for start in range(0, len(indices), batch_size):
            items = [self.dataset[i] for i in indices[start : start + batch_size]]
            batch = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device) for k in items[0]}
            if self.cached:
                batch["flip"] = torch.zeros(len(items), dtype=torch.bool, device=device)
            yield batch

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's scaled latents (N, C, h, w) on the batch's device."""
        eps = batch.get("posterior_eps")
        if self.cached:
            moments = batch["moments"]  # (N, 2, 2C, h, w)
            pick = batch["flip"].long().view(-1, 1, 1, 1, 1).expand(-1, 1, *moments.shape[2:])
            moments = moments.gather(1, pick).squeeze(1)  # (N, 2C, h, w)
            return moments_to_latents(moments, self.scale, self.shift, eps)
        if self.vae.vae.device != batch["image"].device:  # diffusers' module knows its device
            self.vae.to(batch["image"].device)
        # The training step's autocast is switched off here; the VAE runs at latent.vae_precision (fp32: exact).
        with torch.autocast(batch["image"].device.type, enabled=False):
            return self.vae.encode(batch["image"].float(), eps)

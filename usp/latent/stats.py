"""Per-channel latent statistics of a latent cache, as LightningDiT computes them (its `latents_stats.pt`).

LightningDiT (datasets/img_latent_dataset.py `compute_latent_stats`) normalises VA-VAE latents per channel,
`(x − mean_c) / std_c × multiplier`, with mean_c and std_c taken over a random 10 000 of its cached training latents:
unflipped ones, each a posterior *sample* (extract_features.py stores `posterior.sample()`), reduced over N, H, W,
std unbiased (torch's default). `usp cache-latents` does the same on its cache (raw moments, [plain, flipped]): it
draws the images and one posterior sample each from a fixed seed, and writes {"mean": (1, C, 1, 1), "std": (1, C,
1, 1)} as `latents_stats.pt` beside the cache, with the split and image count it came from. The first split
cached into a folder writes the file and later splits leave it alone (`usp cache-latents` builds the training
split first). A latent space with per-channel statistics uses it when no published file is given
(usp.latent.vae: the published `latents_stats.pt` beside the checkpoint wins).

Sums run in float64 over chunks: the result is the two-pass mean/std to float32 rounding, without holding 10 000
latents in float64 at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

STATS_FILE = "latents_stats.pt"  # LightningDiT's name and layout
MAX_IMAGES = 10_000  # LightningDiT: min(10000, len(dataset))
STATS_SEED = 0
PENDING = "pending"  # the normalisation hash of a space whose statistics the cache being built will supply


def channel_stats(moments: np.ndarray | torch.Tensor, max_images: int = MAX_IMAGES, seed: int = STATS_SEED,
                  chunk: int = 500) -> dict[str, torch.Tensor]:
    """moments: (N, 2C, h, w) raw posterior [mean | logvar] of unflipped images -> {"mean", "std"}: (1, C, 1, 1).

    Up to `max_images` images drawn without replacement (all of them when N ≤ max_images), one posterior sample
    each (mean + exp(logvar / 2)·ε, the logvar clamp diffusers applies); mean and unbiased std per channel over N, H, W.
    """
    count = moments.shape[0]
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(count, generator=gen)[: min(max_images, count)].sort().values  # sorted: sequential reads
    total, total_sq, n = 0.0, 0.0, 0
    for start in range(0, len(picked), chunk):
        index = picked[start : start + chunk].numpy()
        part = torch.as_tensor(np.asarray(moments[index]), dtype=torch.float32)  # (B, 2C, h, w)
        mean, logvar = part.chunk(2, dim=1)
        sample = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)).double()
        total = total + sample.sum(dim=(0, 2, 3))
        total_sq = total_sq + sample.square().sum(dim=(0, 2, 3))
        n += sample.shape[0] * sample.shape[2] * sample.shape[3]
    if n < 2:
        raise ValueError("per-channel statistics need at least two latent values per channel")
    mean_c = total / n
    var_c = (total_sq - n * mean_c.square()) / (n - 1)  # unbiased, as torch.std
    shape = (1, -1, 1, 1)
    return {"mean": mean_c.float().reshape(shape), "std": var_c.clamp_min(0).sqrt().float().reshape(shape)}


def write_cache_stats(cache_file: str | Path) -> Path | None:
    """Write `latents_stats.pt` beside a complete cache file unless the folder has one; returns its path (None while
    the cache is incomplete). A cache whose header waits for these statistics (VA-VAE without a published file)
    gets their normalisation hash recorded, so runs that read the cache are checked against them."""
    from usp.latent.cache import _arrays, _write_header, read_header
    from usp.latent.vae import channel_norm, norm_fingerprint

    cache_file = Path(cache_file)
    header = read_header(cache_file)
    if header["done"] < header["count"]:
        return None
    out = cache_file.parent / STATS_FILE
    if not out.exists():
        moments, _ = _arrays(cache_file, header, "r")
        stats = channel_stats(moments[:, 0])  # unflipped
        tmp = out.with_suffix(".tmp")
        torch.save({**stats, "split": cache_file.stem, "images": min(MAX_IMAGES, header["count"])}, tmp)
        tmp.replace(out)
    if header.get("norm_sha256") == PENDING:
        stats = torch.load(out, map_location="cpu", weights_only=True)
        header["norm_sha256"] = norm_fingerprint(*channel_norm(header["latent_space"], stats, out))
        _write_header(cache_file, header)
    return out


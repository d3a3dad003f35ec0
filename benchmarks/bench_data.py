"""Data-path table: latents from usp's cache against on-the-fly SD-VAE encoding (fp32 and bf16)."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import torch
import torch.nn as nn
from bench_common import LATENT, SD_VAE_CONFIG, Context, cpu_has_bf16, fmt, measure, table, timing_note


class _RandomMoments(nn.Module):
    """Stands in for the VAE when filling the benchmark cache: random moments of the right shape, no encoding."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.channels, self.side = channels, side
        self.config = {"latent_channels": channels}  # what LatentSpace checks against the latent space's table
        self.generator = torch.Generator().manual_seed(0)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        moments = torch.randn(images.shape[0], 2 * self.channels, self.side, self.side, generator=self.generator)
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=moments))


class _BlankImages(torch.utils.data.Dataset):
    """Items as build_cache expects them; the stand-in VAE ignores the (tiny) images."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(3, 8, 8), "label": index % 1000}


def sd_vae_space() -> nn.Module:
    """An SD-VAE-sized latent space with random weights (no download)."""
    from diffusers import AutoencoderKL

    from usp.latent.vae import LATENT_SPACES, LatentSpace

    torch.manual_seed(0)
    return LatentSpace("sd-vae-ft-ema", AutoencoderKL(**SD_VAE_CONFIG), LATENT_SPACES["sd-vae-ft-ema"].scale)


def bench_data(ctx: Context) -> str:
    """Latents from usp's cache (the training data path) vs encoding 256 px images with an SD-VAE-sized encoder."""
    from torch.utils.data import DataLoader

    from usp.config import load_config
    from usp.data.sampler import ResumableSampler, SeededDataset
    from usp.latent.cache import build_cache
    from usp.latent.data import LatentData
    from usp.latent.vae import LatentSpace

    s = ctx.sizes
    with tempfile.TemporaryDirectory() as folder:
        stub = LatentSpace("sd-vae-ft-ema", _RandomMoments(LATENT["channels"], LATENT["side"]), 0.18215)
        build_cache(_BlankImages(s.cache_items), stub, 256, folder, "train", batch_size=256, progress=False)
        config = load_config(None, ["latent.space=sd-vae-ft-ema", f"latent.cache={folder}", "data.image_size=256",
                                    "latent.sample_posterior=true"])
        data = LatentData(config, "train", augment=True)  # flip coin and posterior sample, as training draws them
        loader = DataLoader(SeededDataset(data.dataset, data.extras), batch_size=s.cache_batch, drop_last=True,
                            sampler=ResumableSampler(len(data.dataset), seed=0), num_workers=0,
                            pin_memory=ctx.cuda)

        def read_epoch() -> int:
            count = 0
            for batch in loader:
                batch = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                count += data.latents(batch).shape[0]
            return count

        space = sd_vae_space().to(ctx.device)
        images = torch.rand(s.vae_batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(ctx.device)
        images = images * 2 - 1

        def encode() -> torch.Tensor:
            return space.encode(images)

        timings = measure({"cache": read_epoch, "encode": encode}, ctx.device, s.warmup, s.iters)
    cache_rate = timings["cache"].first / timings["cache"].median
    encode_rate = s.vae_batch / timings["encode"].median
    rows = [
        [f"latent cache → latents (DataLoader, {s.cache_items} items, flip + posterior sample)", str(s.cache_batch),
         fmt(cache_rate), fmt(1e3 / cache_rate, 3), "1.00"],
        ["SD-VAE-sized AutoencoderKL encode of 256 px images (on the fly)", str(s.vae_batch), fmt(encode_rate),
         fmt(1e3 / encode_rate), fmt(cache_rate / encode_rate)],
    ]
    verdict = "met" if cache_rate / encode_rate >= 20 else "NOT met"
    notes = [
        f"ratio = cost per latent ÷ the cache's cost per latent (target ≥ 20: {verdict}).",
        "cache: usp's LatentCacheDataset + SeededDataset + ResumableSampler + LatentData.latents, one process "
        "(num_workers=0), file in the page cache; encode: random weights, image decoding and augmentation not "
        "counted, so the real saving is larger.",
        f"{timing_note(ctx, 'epochs / batches')}",
    ]
    return table("Data path: cached latents vs on-the-fly VAE encoding", ["path", "batch", "images/s", "ms/image",
                                                                          "ratio"], rows, notes)




def bench_vae(ctx: Context) -> str:
    """SD-VAE-sized encode and decode at fp32, bf16 autocast, and bf16 + channels-last (usp.latent.vae switches):
    time per round against fp32, and the latent (decoded image) error against fp32 on the same batch."""
    from bench_common import pair_ratios, ratio_cell

    s = ctx.sizes
    batch = max(s.vae_batch, 2)
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1
    variants = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
                "bf16 + channels-last": {"precision": "bf16", "channels_last": True}}
    spaces = {name: sd_vae_space().set_speed(**kw).to(ctx.device) for name, kw in variants.items()}
    encode = measure({name: (lambda sp=sp: sp.encode(images)) for name, sp in spaces.items()}, ctx.device, 1, 3)
    ref = encode["fp32"].first
    latents = ref[:1]
    decode = measure({name: (lambda sp=sp: sp.decode(latents)) for name, sp in spaces.items()}, ctx.device, 1, 3)
    rows = []
    for name in variants:
        e, d = encode[name], decode[name]
        rows.append([name, fmt(1e3 * e.median / batch), ratio_cell(pair_ratios(e, encode["fp32"])),
                     f"{(e.first - ref).abs().max().item():.2e}", fmt(1e3 * d.median),
                     ratio_cell(pair_ratios(d, decode["fp32"])), f"{(d.first - decode['fp32'].first).abs().max():.2e}"])
    notes = [
        f"encode: {batch} images of 256 px → scaled 32×32×4 latents (|latent| ≤ {ref.abs().max().item():.2f} here); "
        "decode: one latent → a 256 px image in [-1, 1]. Random weights (no download), SD-VAE layout.",
        "ratio = variant time ÷ fp32 time per interleaved round, median [min – max] of 3 rounds after a warm-up.",
        "max |Δ| against the fp32 result of the same batch; the paper recipes keep latent.vae_precision=fp32.",
        f"{ctx.device.type}{' with native bf16 dot products (AVX512-BF16)' if cpu_has_bf16() else ''}.",
    ]
    header = ["precision", "encode ms/image", "encode ratio [min – max]", "latent max |Δ|", "decode ms",
              "decode ratio [min – max]", "image max |Δ|"]
    return table("VAE encode/decode precision (usp.latent.vae.LatentSpace.set_speed)", header, rows, notes)

"""Latent spaces: a frozen VAE, its channels, downsampling factor and scale, behind one interface.

A latent space is chosen by name (`LATENT_SPACES`); models only see *scaled* latents
`z = scale · (x − shift)` where x is the posterior mean or a posterior sample. The raw posterior
moments (mean, log-variance) are what the latent cache stores.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LatentSpec:
    channels: int
    factor: int  # spatial downsampling
    scale: float | None  # None: read from the VAE folder's latent_stats.json (small VAEs usp trains)
    shift: float = 0.0
    default_path: str | None = None  # hub id or local path
    kind: str = "diffusers"  # diffusers: AutoencoderKL folder/hub id; ldm: a single LDM-layout checkpoint


# The one table of latent constants. SD-VAE scale from Rombach et al. (LDM); KL-16 scale as USP/MAR use it.
LATENT_SPACES: dict[str, LatentSpec] = {
    "sd-vae-ft-ema": LatentSpec(4, 8, 0.18215, default_path="stabilityai/sd-vae-ft-ema"),
    "sd-vae-ft-mse": LatentSpec(4, 8, 0.18215, default_path="stabilityai/sd-vae-ft-mse"),
    "kl16": LatentSpec(16, 16, 0.2325, kind="ldm"),
    "small-f4": LatentSpec(8, 4, None),  # `usp train-vae` output, for 32×32 data such as Fashion-MNIST
}

STATS_FILE = "latent_stats.json"

# The KL-16 autoencoder (LDM kl-f16 layout with 16 latent channels, as MAR and USP use it).
KL16_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5,
    block_out_channels=[128, 128, 256, 256, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=256,
)

# An f4 AutoencoderKL layout: what a `small-f4` folder may also hold instead of usp's SmallVAE
# (tests build tiny ones from it to exercise the diffusers loading path).
F4_AUTOENCODER_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    sample_size=32,
)


def spec_of(name: str) -> LatentSpec:
    if name not in LATENT_SPACES:
        raise ValueError(f"unknown latent space {name!r}; choose one of {', '.join(LATENT_SPACES)}")
    return LATENT_SPACES[name]


def _load_ldm_checkpoint(path: Path, config: dict) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state, vae.config)
    vae.load_state_dict(converted, strict=True)
    return vae


def scale_and_shift(name: str, path: str | None = None) -> tuple[float, float]:
    """The latent constants of a space without loading its VAE (enough to read a latent cache)."""
    spec = spec_of(name)
    if spec.scale is not None:
        return spec.scale, spec.shift
    if path is None:
        raise ValueError(f"latent space {name!r} keeps its scale beside its VAE: set latent.path to the VAE folder")
    stats_path = Path(path) / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} missing: the small VAE folder must come from `usp train-vae`")
    stats = json.loads(stats_path.read_text())
    return float(stats["scale"]), float(stats["shift"])


def moments_to_latents(moments: torch.Tensor, scale: float, shift: float,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2C, h, w) raw [mean | logvar] -> scaled latents (N, C, h, w): the mean, or mean + std·eps."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if eps is not None:
        mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps  # the clamp diffusers applies
    return (mean - shift) * scale


VaePrecision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LatentSpace(nn.Module):
    """A frozen VAE with its constants. Images are (N, 3, H, W) in [-1, 1].

    precision: None (the caller's autocast, if any, applies), 'fp32' (exact, even inside a caller's autocast), or
    'bf16' / 'fp16' autocast around the VAE (the official USP/DiT code encodes under
    fp16 autocast on GPUs; the SD-VAE encode costs ~3.6× a ViT-B/2 training step in FLOPs). Moments and images come
    back as float32 whatever the precision. channels_last: the VAE's convolutions in NHWC layout (faster cuDNN and
    oneDNN kernels); it changes no value beyond float rounding.
    """

    def __init__(self, name: str, vae: nn.Module, scale: float, shift: float = 0.0, *,
                 precision: VaePrecision | None = None, channels_last: bool = False):
        super().__init__()
        self.name, self.vae, self.scale, self.shift = name, vae.eval().requires_grad_(False), scale, shift
        self.set_speed(precision, channels_last)
        spec = spec_of(name)
        self.channels, self.factor = spec.channels, spec.factor
        vae_channels = vae.config["latent_channels"]
        if vae_channels != spec.channels:
            raise ValueError(f"this VAE has {vae_channels} latent channels but latent space {name!r} has "
                             f"{spec.channels}; use a VAE made for {name!r} (for small-f4: `usp train-vae` with "
                             f"vae.latent_channels={spec.channels})")

    def set_speed(self, precision: VaePrecision | None = None, channels_last: bool = False) -> LatentSpace:
        """Choose the VAE's compute precision and memory layout (see the class docstring)."""
        if precision not in (None, "fp32", *_DTYPES):
            raise ValueError(f"VAE precision must be None, 'fp32', 'bf16' or 'fp16', got {precision!r}")
        self.precision, self.channels_last = precision, channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        return self

    def _fast(self, images: torch.Tensor) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
        """The input in the chosen layout, and the autocast context of the chosen precision."""
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.precision is None:
            return images, contextlib.nullcontext()
        if self.precision == "fp32":
            return images, torch.autocast(images.device.type, enabled=False)  # exact even inside a caller's autocast
        return images, torch.autocast(images.device.type, dtype=_DTYPES[self.precision])

    @classmethod
    def load(cls, name: str, path: str | None = None, *, precision: VaePrecision | None = None,
             channels_last: bool = False) -> LatentSpace:
        """Load the VAE of latent space `name` from `path` (a hub id, a diffusers folder or a checkpoint)."""
        from diffusers import AutoencoderKL

        spec = spec_of(name)
        path = path or spec.default_path
        if path is None:
            raise ValueError(f"latent space {name!r} has no default location: set latent.path to its VAE")
        local = Path(path)
        if spec.kind == "ldm":
            if not local.is_file():
                raise FileNotFoundError(f"KL-16 checkpoint {local} not found; set latent.path to the .ckpt file")
            vae = _load_ldm_checkpoint(local, KL16_CONFIG)
        else:
            if not local.exists() and (path.startswith(("/", ".", "~")) or spec.scale is None):
                raise FileNotFoundError(
                    f"VAE folder {path} for latent space {name!r} not found"
                    + ("; train one with `usp train-vae`" if spec.scale is None else "")
                )
            from usp.latent.small_vae import SmallVAE, is_small_vae_folder

            if local.is_dir() and is_small_vae_folder(local):
                vae = SmallVAE.from_pretrained(local)
            else:
                try:
                    vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
                except OSError as err:  # offline, or not in the hub cache: name the asset and the local-path key
                    raise FileNotFoundError(
                        f"cannot load the VAE {path!r} of latent space {name!r} ({str(err).splitlines()[0]}). "
                        "Without network: run `usp fetch RECIPE --cache DIR` on a connected machine and set "
                        "HF_HOME=DIR/hf here, or set latent.path to a local diffusers folder of this VAE") from err
        return cls(name, vae, *scale_and_shift(name, path), precision=precision, channels_last=channels_last)

    def check_image_size(self, image_size: int) -> int:
        """The latent side for `image_size`, or a ValueError naming the fix."""
        if image_size % self.factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the {self.name} VAE factor {self.factor}; "
                f"use e.g. {image_size // self.factor * self.factor or self.factor}"
            )
        return image_size // self.factor

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> raw posterior moments (N, 2C, H/f, W/f): [mean | logvar]."""
        self.check_image_size(images.shape[-1])
        images, autocast = self._fast(images)
        with autocast:
            return self.vae.encode(images).latent_dist.parameters.float().contiguous()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f); the posterior mean,
        or a posterior sample when standard-normal `eps` (N, C, H/f, W/f) is given."""
        return moments_to_latents(self.moments(images), self.scale, self.shift, eps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (N, C, h, w) -> images (N, 3, h·f, w·f) in [-1, 1] (not clamped)."""
        latents, autocast = self._fast(latents / self.scale + self.shift)
        with autocast:
            return self.vae.decode(latents).sample.float().contiguous()

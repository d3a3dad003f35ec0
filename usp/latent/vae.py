"""Latent spaces: a frozen VAE, its channels, downsampling factor and normalisation, behind one interface.

A latent space is chosen by name (`LATENT_SPACES`); models only see *normalised* latents
`z = scale · (x − shift)` where x is the posterior mean or a posterior sample, and scale/shift are each one
number or one per channel (VA-VAE: shift = mean_c, scale = multiplier / std_c, which is LightningDiT's
`(x − mean) / std × multiplier`). `normalise` / `denormalise` are the one place that applies them (encode,
decode, and latents read from the cache). The raw posterior moments (mean, log-variance) are what the
latent cache stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from usp.latent.ldm import KL16_LAYOUT, VAVAE_F16D32_LAYOUT, LdmLayout, load_ldm_checkpoint
from usp.run.runtime import AUTOCAST_DTYPES

# One number for every channel, or one per channel.
Stat = float | tuple[float, ...]
# Where a space's normalisation comes from:
#   constant       scale/shift of the table (SD-VAE, KL-16);
#   usp_stats      latent_stats.json in the VAE folder (small VAEs `usp train-vae` writes; one scale/shift, or
#                  a list per channel);
#   channel_stats  a per-channel mean/std file beside the checkpoint (LightningDiT's latents_stats.pt:
#                  {"mean": (1, C, 1, 1), "std": (1, C, 1, 1)}), times the table's scale (the multiplier);
#   vae_config     the diffusers config.json of the VAE: latents_mean/latents_std per channel when it has
#                  them (with scaling_factor), else scaling_factor and shift_factor.
NormSource = Literal["constant", "usp_stats", "channel_stats", "vae_config"]


@dataclass(frozen=True)
class LatentSpec:
    channels: int
    factor: int  # spatial downsampling
    scale: float | None  # constant: z = scale·(x − shift); channel_stats: the multiplier; else None (read)
    shift: float = 0.0
    default_path: str | None = None  # hub id or local path
    kind: Literal["diffusers", "ldm"] = "diffusers"  # ldm: one LDM-layout checkpoint file of `layout`
    norm: NormSource = "constant"
    layout: LdmLayout | None = None
    stats_file: str | None = None  # channel_stats: the file's name beside the checkpoint


# The one table of latent constants. SD-VAE scale from Rombach et al. (LDM); KL-16 scale as USP/MAR use it.
# VA-VAE: per-channel statistics as LightningDiT publishes them beside its checkpoint, multiplier 1.0
# (LightningDiT configs/lightningdit_xl_vavae_f16d32.yaml, data.latent_multiplier). E2E-VAE (REPA-E's
# end-to-end tuned SD-VAE, an f8d4 diffusers AutoencoderKL): its constants are read from its own config.json
# (no value of it is written here: none could be checked offline).
LATENT_SPACES: dict[str, LatentSpec] = {
    "sd-vae-ft-ema": LatentSpec(4, 8, 0.18215, default_path="stabilityai/sd-vae-ft-ema"),
    "sd-vae-ft-mse": LatentSpec(4, 8, 0.18215, default_path="stabilityai/sd-vae-ft-mse"),
    "kl16": LatentSpec(16, 16, 0.2325, kind="ldm", layout=KL16_LAYOUT),
    "va-vae-f16d32": LatentSpec(32, 16, 1.0, kind="ldm", layout=VAVAE_F16D32_LAYOUT, norm="channel_stats",
                                stats_file="latents_stats.pt"),
    "e2e-vae": LatentSpec(4, 8, None, default_path="REPA-E/e2e-sdvae-hf", norm="vae_config"),
    "small-f4": LatentSpec(8, 4, None, norm="usp_stats"),  # `usp train-vae` output, for 32×32 data (Fashion-MNIST)
}

STATS_FILE = "latent_stats.json"

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


def _per_channel(value: Stat, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar as is; a per-channel tuple as a (C, 1, 1) tensor that broadcasts over (C, h, w) and (N, C, h, w)."""
    if isinstance(value, tuple):
        if like.ndim < 3 or like.shape[-3] != len(value):
            raise ValueError(f"latents of shape {tuple(like.shape)} do not have the {len(value)} channels "
                             "this normalisation holds one value each for")
        return torch.tensor(value, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    return value


def _known(scale: Stat | None) -> None:
    if scale is None:  # LatentSpace.load(..., cache=...) before `usp cache-latents` has computed the statistics
        raise ValueError("this latent space's per-channel statistics are not computed yet: finish `usp cache-latents` "
                         "(it writes latents_stats.pt into latent.cache), or put the published file beside latent.path")


def normalise(x: torch.Tensor, scale: Stat, shift: Stat) -> torch.Tensor:
    """Raw VAE latents x (…, C, h, w) -> model latents z = scale · (x − shift), per channel where given."""
    _known(scale)
    return (x - _per_channel(shift, x)) * _per_channel(scale, x)


def denormalise(z: torch.Tensor, scale: Stat, shift: Stat) -> torch.Tensor:
    """Model latents z (…, C, h, w) -> raw VAE latents x = z / scale + shift: the inverse of `normalise`."""
    _known(scale)
    return z / _per_channel(scale, z) + _per_channel(shift, z)


def norm_fingerprint(scale: Stat, shift: Stat) -> str:
    """A short hash of a normalisation; latent caches record it (other statistics make another latent space).
    Statistics not computed yet (scale None) hash to usp.latent.stats.PENDING, which the cache builder replaces."""
    if scale is None:
        from usp.latent.stats import PENDING

        return PENDING
    return hashlib.sha256(json.dumps([scale, shift]).encode()).hexdigest()[:16]


def channel_norm(name: str, stats: dict, source: Path) -> tuple[Stat, Stat]:
    """LightningDiT's `(x − mean_c) / std_c × multiplier` as scale_c = multiplier / std_c, shift_c = mean_c."""
    spec = spec_of(name)
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(f"{source} must hold a dict with 'mean' and 'std' tensors (LightningDiT's layout)")
    mean, std = (torch.as_tensor(stats[k], dtype=torch.float64).flatten() for k in ("mean", "std"))
    if mean.numel() != spec.channels or std.numel() != spec.channels:
        raise ValueError(f"{source} has {mean.numel()} means and {std.numel()} stds but latent space {name!r} has "
                         f"{spec.channels} channels; use the statistics file of this VAE")
    if not bool((std > 0).all()):
        raise ValueError(f"{source} has a std that is not positive; it cannot normalise latents")
    return tuple((spec.scale / std).tolist()), tuple(mean.tolist())


def _channel_stats(name: str, spec: LatentSpec, path: str | None, cache: str | None) -> tuple[Stat, Stat]:
    """The published file beside the checkpoint; else the one `usp cache-latents` wrote into the cache folder."""
    from usp.latent.stats import STATS_FILE

    candidates = ([Path(path).parent / spec.stats_file] if path else []) + ([Path(cache) / STATS_FILE] if cache else [])
    stats_path = next((p for p in candidates if p.is_file()), None)
    if stats_path is None:
        looked = " or ".join(map(str, candidates)) or "no latent.path or latent.cache to look in"
        raise FileNotFoundError(
            f"latent space {name!r} has no per-channel statistics ({looked} not found): put the {spec.stats_file} "
            "published with the checkpoint beside it, or set latent.cache and run `usp cache-latents`, which "
            "computes them there")
    return channel_norm(name, torch.load(stats_path, map_location="cpu", weights_only=True), stats_path)


def _config_norm(name: str, path: str) -> tuple[Stat, Stat]:
    """The normalisation a diffusers AutoencoderKL's config.json declares, as diffusers pipelines apply it."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(path)
    except OSError as err:
        raise FileNotFoundError(f"cannot read the config.json of the VAE {path!r} of latent space {name!r} "
                                f"({str(err).splitlines()[0]}); without network: run `usp fetch RECIPE --cache DIR` "
                                "on a connected machine, or set latent.path to a local diffusers folder") from err
    if config.get("scaling_factor") is None:
        raise ValueError(f"the config.json of the VAE {path!r} has no scaling_factor, which latent space {name!r} "
                         "reads its normalisation from")
    factor = float(config["scaling_factor"])
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:  # SDXL-style: (x − mean_c) · scaling_factor / std_c
        return tuple(factor / float(s) for s in std), tuple(float(m) for m in mean)
    return factor, float(config.get("shift_factor") or 0.0)


def scale_and_shift(name: str, path: str | None = None, cache: str | None = None) -> tuple[Stat, Stat]:
    """The normalisation of a space without loading its VAE (enough to read a latent cache): (scale, shift),
    each one number or one per channel. cache: the latent cache folder, where per-channel statistics are looked
    for when none are published beside the checkpoint (usp.latent.stats)."""
    spec = spec_of(name)
    if spec.norm == "constant":
        return spec.scale, spec.shift
    if spec.norm == "channel_stats":
        return _channel_stats(name, spec, path, cache)
    if spec.norm == "vae_config":
        return _config_norm(name, path or spec.default_path)
    if path is None:
        raise ValueError(f"latent space {name!r} keeps its scale beside its VAE: set latent.path to the VAE folder")
    stats_path = Path(path) / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} missing: the small VAE folder must come from `usp train-vae`")
    stats = json.loads(stats_path.read_text())

    def stat(value) -> Stat:  # one number, or one per channel (a list)
        return tuple(float(v) for v in value) if isinstance(value, list) else float(value)

    return stat(stats["scale"]), stat(stats["shift"])


def moments_to_latents(moments: torch.Tensor, scale: Stat, shift: Stat,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2C, h, w) raw [mean | logvar] -> normalised latents (N, C, h, w): the mean, or mean + std·eps."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if eps is not None:
        mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps  # the clamp diffusers applies
    return normalise(mean, scale, shift)


VaePrecision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
VAE_BATCH = 8  # images per VAE call unless the recipe says otherwise (latent.vae_batch; fits 24 GB at 512 px)


class LatentSpace(nn.Module):
    """A frozen VAE with its constants. Images are (N, 3, H, W) in [-1, 1].

    precision: None (the caller's autocast, if any, applies), 'fp32' (exact, even inside a caller's autocast), or
    'bf16' / 'fp16' autocast around the VAE (the official USP/DiT code encodes under
    fp16 autocast on GPUs; the SD-VAE encode costs ~3.6× a ViT-B/2 training step in FLOPs). Moments and images come
    back as float32 whatever the precision. channels_last: the VAE's convolutions in NHWC layout (faster cuDNN and
    oneDNN kernels); it changes no value beyond float rounding. max_batch: images per VAE call; larger inputs are
    split (the VAE is frozen and per-image, so the result is the same), which bounds its activation memory.
    """

    def __init__(self, name: str, vae: nn.Module, scale: Stat | None, shift: Stat | None = 0.0, *,
                 precision: VaePrecision | None = None, channels_last: bool = False, max_batch: int = VAE_BATCH):
        super().__init__()
        self.max_batch = max_batch
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
        if precision not in (None, *AUTOCAST_DTYPES):
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
        return images, torch.autocast(images.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    @classmethod
    def load(cls, name: str, path: str | None = None, *, cache: str | None = None,
             precision: VaePrecision | None = None, channels_last: bool = False,
             max_batch: int = VAE_BATCH) -> LatentSpace:
        """Load the VAE of latent space `name` from `path` (a hub id, a diffusers folder or a checkpoint).

        cache: the latent cache folder, where per-channel statistics are read when none are published beside the
        checkpoint; while it has none yet (the cache is being built), the space loads without them and only
        normalising or decoding is refused."""
        from diffusers import AutoencoderKL

        spec = spec_of(name)
        path = path or spec.default_path
        if path is None:
            raise ValueError(f"latent space {name!r} has no default location: set latent.path to its VAE")
        local = Path(path)
        if spec.kind == "ldm":
            if not local.is_file():
                raise FileNotFoundError(f"{name} checkpoint {local} not found; set latent.path to its checkpoint "
                                        "file (.ckpt, .pt or .safetensors)")
            vae = load_ldm_checkpoint(local, spec.layout)
        else:
            if not local.exists() and (path.startswith(("/", ".", "~")) or spec.norm == "usp_stats"):
                raise FileNotFoundError(
                    f"VAE folder {path} for latent space {name!r} not found"
                    + ("; train one with `usp train-vae`" if spec.norm == "usp_stats" else "")
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
        try:
            scale, shift = scale_and_shift(name, path, cache)
        except FileNotFoundError:
            if cache is None or spec.norm != "channel_stats":
                raise
            scale, shift = None, None  # encoding raw moments needs none; usp.latent.stats computes them
        return cls(name, vae, scale, shift, precision=precision, channels_last=channels_last, max_batch=max_batch)

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
        if len(images) > self.max_batch:  # (N, ...) in calls of max_batch images: bounded activations
            return torch.cat([self.moments(chunk) for chunk in images.split(self.max_batch)])
        images, autocast = self._fast(images)
        with autocast:
            return self.vae.encode(images).latent_dist.parameters.float().contiguous()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """images (N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f); the posterior mean,
        or a posterior sample when standard-normal `eps` (N, C, H/f, W/f) is given."""
        return moments_to_latents(self.moments(images), self.scale, self.shift, eps)

    @property
    def norm_fingerprint(self) -> str:
        """The hash of this space's normalisation (see `norm_fingerprint`)."""
        return norm_fingerprint(self.scale, self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (N, C, h, w) -> images (N, 3, h·f, w·f) in [-1, 1] (not clamped)."""
        if len(latents) > self.max_batch:
            return torch.cat([self.decode(chunk) for chunk in latents.split(self.max_batch)])
        latents, autocast = self._fast(denormalise(latents, self.scale, self.shift))
        with autocast:
            return self.vae.decode(latents).sample.float().contiguous()

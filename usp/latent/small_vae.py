"""A small KL autoencoder for 32×32 data (the embedded default's latent space), f4 × 4 channels.

Cheap by design: all convolutions run at the latent resolution; pixels enter and leave through
pixel-(un)shuffle of 4×4 patches, so a CPU trains it in minutes. Its interface is the one of
diffusers' AutoencoderKL that `usp.latent.vae` uses (`encode(x).latent_dist`, `decode(z).sample`),
and `save_pretrained` / `from_pretrained` write and read a folder (config.json + safetensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
CLASS_NAME = "UspSmallVAE"


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


@dataclass
class _Encoded:
    latent_dist: DiagonalGaussianDistribution


@dataclass
class _Decoded:
    sample: torch.Tensor


class SmallVAE(nn.Module):
    def __init__(self, in_channels: int = 3, latent_channels: int = 4, factor: int = 4, width: int = 96,
                 depth: int = 2):
        super().__init__()
        self.config = dict(_class_name=CLASS_NAME, in_channels=in_channels, latent_channels=latent_channels,
                           factor=factor, width=width, depth=depth)
        patch = in_channels * factor * factor
        self.factor = factor
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(factor), nn.Conv2d(patch, width, 3, padding=1),
            *[ResBlock(width) for _ in range(depth)], nn.SiLU(), nn.Conv2d(width, 2 * latent_channels, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), *[ResBlock(width) for _ in range(depth + 1)],
            nn.SiLU(), nn.Conv2d(width, patch, 3, padding=1), nn.PixelShuffle(factor),
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> _Encoded:
        """x: (N, 3, H, W) in [-1, 1] -> posterior over (N, C, H/f, W/f); `.parameters` = [mean | logvar]."""
        return _Encoded(DiagonalGaussianDistribution(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(self.decoder(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Training pass: reconstruction from a posterior sample, and the posterior (for its KL)."""
        posterior = self.encode(x).latent_dist
        return self.decode(posterior.sample()).sample, posterior

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SmallVAE:
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.pop("_class_name", None) != CLASS_NAME:
            raise ValueError(f"{folder} does not hold a usp small VAE (config.json _class_name != {CLASS_NAME})")
        model = cls(**config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return model


def is_small_vae_folder(folder: str | Path) -> bool:
    path = Path(folder) / CONFIG_NAME
    return path.is_file() and json.loads(path.read_text()).get("_class_name") == CLASS_NAME

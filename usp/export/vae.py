"""The demo's small f4 VAE as a diffusers pipeline component (DiTPipeline.from_pretrained loads it, usp installed).

diffusers' `AutoencoderKL` cannot hold usp's `SmallVAE`: that codes each 4×4 pixel patch by a linear map plus a
convolutional correction on pixel-unshuffled patches, where AutoencoderKL is a stack of GroupNorm ResNet blocks
with strided downsampling and a mid-block attention; no assignment of weights makes one the other. And
`DiTPipeline` decodes `vae.decode(latents / vae.config.scaling_factor)`, with no shift and one scale, where a
small-f4 space may normalise per channel with a shift. So the exported `vae/` names this class
(`model_index.json`: ["usp.export.vae", "SmallVAEForDiffusers"]): a ModelMixin whose config keeps
scaling_factor = 1 and whose `decode` applies the space's own `z / scale + shift` first.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers finds the load method through this name)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin as _ModelMixin

from usp.latent.small_vae import SmallVAE, _Decoded
from usp.latent.vae import denormalise


class SmallVAEForDiffusers(_ModelMixin, ConfigMixin):
    """usp's SmallVAE (under `vae.`) plus the latent normalisation, behind diffusers' loading and `decode`."""

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 8, width: int = 64, depth: int = 1,
                 factor: int = 4, latent_scale: float | list[float] = 1.0, latent_shift: float | list[float] = 0.0,
                 scaling_factor: float = 1.0):
        super().__init__()
        self.vae = SmallVAE(in_channels, latent_channels, width, depth, factor)

    def _stat(self, value: float | list[float]) -> float | tuple[float, ...]:
        return tuple(value) if isinstance(value, list) else float(value)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> _Decoded | tuple[torch.Tensor]:
        """Normalised latents (N, C, h, w) (DiTPipeline has divided them by scaling_factor = 1) -> images in [-1, 1]."""
        raw = denormalise(z, self._stat(self.config.latent_scale), self._stat(self.config.latent_shift))
        images = self.vae.decode(raw).sample
        return _Decoded(images) if return_dict else (images,)

    @classmethod
    def from_small_vae(cls, vae: SmallVAE, scale, shift) -> SmallVAEForDiffusers:
        config = {k: v for k, v in vae.config.items() if k != "_class_name"}
        as_json = lambda s: list(s) if isinstance(s, tuple) else float(s)  # noqa: E731
        wrapper = cls(**config, latent_scale=as_json(scale), latent_shift=as_json(shift))
        wrapper.vae.load_state_dict(vae.state_dict(), strict=True)
        return wrapper

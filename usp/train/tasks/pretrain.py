"""USP pretraining: masked latent modeling on VAE latents (the paper's Sec. 3; appendix A's noise ablation)."""

from __future__ import annotations

import torch
import torch.nn as nn

from usp.config import Config
from usp.latent.data import LatentData
from usp.models import create_model


class PretrainTask:
    """USP pretraining: masked latent modeling (optionally with the appendix-A noise ablation)."""

    def __init__(self, config: Config):
        self.config = config
        self.data = LatentData(config, config.data.split, augment=True)
        self.train_set = self.data.dataset
        self.model = create_model(config.model.name, ("vit", "vit_lightning"), latent_size=self.data.latent_size,
                                  in_channels=self.data.spec.channels, norm_pix_loss=config.pretrain.norm_pix_loss,
                                  **config.model.block_options())
        self.num_patches = self.model.num_patches

    def extras(self) -> dict:
        out = self.data.extras()
        out["mask_noise"] = torch.rand(self.num_patches)
        if self.config.pretrain.noise_ablation:
            low = self.config.pretrain.noise_alpha_min
            out["alpha"] = low + (1 - low) * torch.rand(())  # a ~ U[low, 1)
            out["noise"] = torch.randn(self.data.spec.channels, self.data.latent_size, self.data.latent_size)
        return out

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        clean = self.data.latents(batch)  # (N, C, h, w)
        inputs = clean
        if "alpha" in batch:  # appendix A: noisy input, clean target
            alpha = batch["alpha"].view(-1, 1, 1, 1)
            inputs = alpha.sqrt() * clean + (1 - alpha).sqrt() * batch["noise"]
        loss, _, _ = model(inputs, self.config.pretrain.mask_ratio, target=clean, noise=batch["mask_noise"])
        return {"loss": loss}

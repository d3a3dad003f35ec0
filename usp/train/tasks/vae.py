"""`usp train-vae`: the small f4 KL autoencoder that gives small images (32 px) a latent space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from usp.config import Config
from usp.data.images import build_image_dataset, build_transform


class VAETask:
    """Train the small KL autoencoder of a latent space for small data (`usp train-vae`)."""

    def __init__(self, config: Config):
        from usp.latent.small_vae import SmallVAE

        self.config = config
        dc = config.data
        transform = build_transform(dc.image_size, "center", hflip=dc.hflip, normalize="half")
        self.train_set = build_image_dataset(dc.source, dc.root, dc.split, transform, dc.limit, dc.download, dc.exclude)
        vc = config.vae
        self.model = SmallVAE(latent_channels=vc.latent_channels, width=vc.width, depth=vc.depth)
        if vc.init_images:  # a resumed run overwrites this with its checkpoint
            count = min(vc.init_images, len(self.train_set))
            self.model.init_from_data(torch.stack([self.train_set[i]["image"] for i in range(count)]))

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        recon, posterior = model(images)
        mse = F.mse_loss(recon, images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, to be comparable with the MSE
        return {"loss": mse + self.config.vae.kl_weight * kl, "mse": mse, "kl": kl}

    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """At the end: PSNR on the evaluation split, latent statistics, and the VAE folder."""
        if not final:
            return {}
        dc = self.config.data
        test = build_image_dataset(dc.source, dc.root, dc.eval_split, build_transform(
            dc.image_size, "center", hflip=False, normalize="half"), limit=dc.limit, download=dc.download,
            exclude=dc.exclude)
        model.eval()
        device = next(model.parameters()).device
        mse_sum, count, means = 0.0, 0, []
        with torch.no_grad():
            for start in range(0, len(test), 500):
                images = torch.stack([test[i]["image"] for i in range(start, min(start + 500, len(test)))]).to(device)
                mean = model.encode(images).latent_dist.mean
                recon = model.decode(mean).sample.clamp(-1, 1)
                # PSNR in [0, 1] units: the [-1, 1] range has peak-to-peak 2, so MSE/4.
                mse_sum += ((recon - images) ** 2).mean(dim=(1, 2, 3)).div(4).sum().item()
                count += len(images)
                means.append(mean.cpu())
        mse = mse_sum / count
        psnr = 10 * math.log10(1.0 / mse)
        latents = torch.cat(means)
        stats = {"scale": 1.0 / latents.std().item(), "shift": latents.mean().item(), "psnr_test": psnr}
        if runtime.is_main:
            out = Path(self.config.vae.out or run_dir / "vae")
            model.save_pretrained(str(out))
            (out / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        return {"psnr_test": psnr, "latent_scale": stats["scale"]}

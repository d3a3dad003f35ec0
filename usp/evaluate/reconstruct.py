"""The paper's restoration figure: original | masked | reconstruction, decoded by the VAE."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from usp.config import config_from_dict
from usp.data.images import build_image_dataset, build_transform
from usp.latent.vae import LatentSpace
from usp.models import create_model
from usp.models.vit import patchify, unpatchify
from usp.train.checkpoint import load_strict, load_weights


def reconstruct_grid(weights: str | Path, out: str | Path, num_images: int = 8, mask_ratio: float = 0.75,
                     seed: int = 0, overrides: list[str] | tuple = ()) -> Path:
    """Mask `mask_ratio` of the latent patches of the first `num_images` evaluation images, reconstruct,
    decode, and save a 3-row PNG grid: originals, masked inputs (masked patches grey), reconstructions."""
    state, meta = load_weights(weights)
    if meta.get("task") != "pretrain":
        raise ValueError(f"{weights} holds {meta.get('task') or 'unknown'} weights; reconstruct needs a pretraining "
                         "checkpoint (runs/<name>/checkpoints/weights_*.safetensors of `usp pretrain`)")
    config = config_from_dict(meta["config"], overrides)
    dc = config.data
    latent = LatentSpace.load(config.latent.space, config.latent.path)
    latent_size = latent.check_image_size(dc.image_size)
    model = create_model(config.model.name, ("vit",), latent_size=latent_size, in_channels=latent.channels,
                         norm_pix_loss=config.pretrain.norm_pix_loss)
    load_strict(model, state, str(weights))
    model.eval()

    transform = build_transform(dc.image_size, "center", hflip=False, normalize=dc.normalize)
    dataset = build_image_dataset(dc.source, dc.root, dc.eval_split, transform, download=dc.download,
                                  exclude=dc.exclude)
    images = torch.stack([dataset[i]["image"] for i in range(min(num_images, len(dataset)))])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = latent.encode(images)  # (N, C, h, w)
        noise = torch.rand(len(z), model.num_patches, generator=generator)
        _, pred, mask = model(z, mask_ratio, noise=noise)
        restored = model.reconstruct(z, pred, mask)
        masked = patchify(z, model.patch_size) * (1 - mask.unsqueeze(-1))
        masked = unpatchify(masked, model.patch_size, latent.channels)
        decoded = [latent.decode(x).clamp(-1, 1) for x in (z, masked, restored)]
        # Grey out masked regions in pixel space so the masked row shows what the encoder did not see.
        pixel_mask = torch.nn.functional.interpolate(
            unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.patch_size**2), model.patch_size, 1),
            scale_factor=latent.factor, mode="nearest")
        decoded[1] = decoded[1] * (1 - pixel_mask)
    grid = torch.cat([images.clamp(-1, 1), decoded[1], decoded[2]])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((grid + 1) / 2, out, nrow=len(images), padding=1)
    return out

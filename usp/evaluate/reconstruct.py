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
from usp.run.weights import load_strict, load_weights, resolve_weights


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
    latent = LatentSpace.load(config.latent.space, config.latent.path, cache=config.latent.cache,
                              max_batch=config.latent.vae_batch)
    latent_size = latent.check_image_size(dc.image_size)
    model = create_model(config.model.name, ("vit", "vit_lightning"), latent_size=latent_size,
                         in_channels=latent.channels, norm_pix_loss=config.pretrain.norm_pix_loss,
                         **config.model.block_options())
    load_strict(model, state, str(weights))
    model.eval()

    transform = build_transform(dc.image_size, "center", hflip=False, normalize=dc.normalize)
    dataset = build_image_dataset(dc.source, dc.root, dc.eval_split, transform, download=dc.download,
                                  exclude=dc.exclude)
    images = torch.stack([dataset[i]["image"] for i in across_classes(dataset, num_images)])
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
    _label_rows(out, ("original", "masked", "reconstruction"))
    return out


def across_classes(dataset, count: int) -> list[int]:
    """Indices of `count` items taking each class in turn (the first item of every class, then the second, ...),
    so the figure shows the classes rather than the first class of a sorted folder."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [label for _, label in getattr(dataset, "samples", [])]
    if len(labels) != len(dataset):  # a dataset that does not say its labels: the first items
        return list(range(min(count, len(dataset))))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    for rank in range(max(map(len, queues), default=0)):
        picked += [queue[rank] for queue in queues if rank < len(queue)][: count - len(picked)]
        if len(picked) == count:
            break
    return picked


def _label_rows(path: Path, names: tuple[str, ...]) -> None:
    """Write each row's name in a margin left of the grid (PIL's default font: no font files needed)."""
    from PIL import Image, ImageDraw

    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    margin = 6 * max(map(len, names)) + 8
    labelled = Image.new("RGB", (grid.width + margin, grid.height), "white")
    labelled.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    row = grid.height / len(names)
    for i, name in enumerate(names):
        draw.text((2, int(row * (i + 0.5)) - 5), name, fill="black")
    labelled.save(path)


def reconstruct_command(weights: str, overrides: list[str], out: str = "reconstruction.png", num_images: int = 8,
                        mask_ratio: float = 0.75, seed: int = 0) -> None:
    """`usp reconstruct WEIGHTS`: `reconstruct_grid` of a weights file or a run folder (its latest)."""
    path = reconstruct_grid(resolve_weights(weights), out, num_images=num_images, mask_ratio=mask_ratio, seed=seed,
                            overrides=overrides)
    print(f"wrote {path}")

"""REPA's teacher tokens, computed once beside the latent cache: for every cached image and its flip.

A run that trains on cached latents has no images at train time, so the frozen teacher's patch tokens
(usp.models.repa) are extracted once from the same images, in the same order, plain and horizontally flipped
exactly as the latent cache stores them: an item's flip coin picks the flipped latent *and* the flipped image's
tokens. Tokens are stored already matched to the generator's token grid, as float16 (a cosine target).

Files, in `<latent cache>/repa-<teacher tag>/`: `<split>.npy` (N, 2, T, D) float16 and `<split>.json`, written
last, naming what made them: the teacher (timm name, sha256 of its weights, input size), the grid, and the
latent cache's count and VAE fingerprint. A run whose recipe differs in any of them is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from usp.latent.cache import LatentCacheDataset, _arrays

log = logging.getLogger("usp")


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's weights (names, shapes, bytes)."""
    h = hashlib.sha256()
    for key, value in sorted(teacher.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def features_dir(cache_folder: str | Path, teacher_name: str, weights: str | None) -> Path:
    stem = Path(weights).stem if weights and weights != "timm" and not weights.startswith("hf-hub:") else "pretrained"
    return Path(cache_folder) / ("repa-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{teacher_name}-{stem}"))


def _made_by(teacher, latents: LatentCacheDataset, grid: int) -> dict:
    return {"teacher": teacher.name, "teacher_sha256": teacher_fingerprint(teacher), "teacher_size":
            teacher.image_size, "grid": grid, "count": len(latents), "vae_sha256": latents.header.get("vae_sha256")}


def build_features(teacher, images: Dataset, latents: LatentCacheDataset, folder: Path, split: str, grid: int,
                   batch_size: int = 250, device: str | torch.device = "cpu") -> Path:
    """Tokens (N, 2, grid², D) of `images` (items {"image": (3, H, W) in [-1, 1], "label"}, unaugmented, the
    order of the latent cache: their labels are checked against the cache's) and of their flips."""
    from usp.models.repa import match_grid

    if len(images) != len(latents):
        raise ValueError(f"{len(images)} images for a latent cache of {len(latents)}; build the teacher tokens from "
                         "the images (and data.limit) the cache was made from")
    folder.mkdir(parents=True, exist_ok=True)
    header = _made_by(teacher, latents, grid)
    if teacher.grid != grid:
        log.info(f"repa: the teacher's {teacher.grid}x{teacher.grid} token grid is interpolated to the generator's "
                 f"{grid}x{grid} ({'area' if teacher.grid % grid == 0 else 'bilinear'})")
    array = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(images), 2, grid * grid, teacher.dim))
    cache_labels = np.asarray(_arrays(latents.path, latents.header, "r")[1][: len(latents)])
    teacher.to(device)
    start = 0
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        labels = batch["label"].numpy()
        if not np.array_equal(labels, cache_labels[start : start + len(labels)]):
            raise ValueError(f"the images' labels differ from the latent cache's at items {start}.."
                             f"{start + len(labels)}: these are not the images the cache was made from "
                             "(check data.root / data.limit)")
        x = batch["image"].to(device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            both = teacher.tokens(torch.cat([x, x.flip(-1)]))  # (2B, T, D), the flip as build_cache makes it
        both = match_grid(both.float(), grid)  # (2B, grid², D)
        n = x.shape[0]
        array[start : start + n] = torch.stack([both[:n], both[n:]], dim=1).cpu().numpy().astype(np.float16)
        start += n
    array.flush()
    (folder / f"{split}.json").write_text(json.dumps(header, indent=1) + "\n")  # last: the file is complete
    return folder / f"{split}.npy"


def recipe_token_grid(config) -> int:
    """The generator's token grid side for a recipe: image size / latent factor / patch size (what REPA aligns)."""
    from usp.latent.vae import spec_of
    from usp.models import model_entry

    patch = model_entry(config.model.name, ("dit", "sit")).patch_size
    return config.data.image_size // spec_of(config.latent.space).factor // patch


def load_repa_teacher(name: str, weights: str | None, img_size: int | None = None):
    """repa.teacher with repa.teacher_weights: a local .safetensors / .pt / .pth file (read by `usp.run.weights`; a
    safetensors file may name extra timm constructor arguments in its metadata key "timm_kwargs", for small
    stand-in teachers), or "timm" / "hf-hub:<id>" for timm's own pretrained download."""
    from usp.models.repa import load_teacher
    from usp.run.weights import file_metadata, load_weights

    if weights is None or weights == "timm" or weights.startswith("hf-hub:"):
        return load_teacher(name, weights, img_size)
    state, _ = load_weights(weights)
    kwargs = json.loads(file_metadata(weights).get("timm_kwargs", "{}"))
    return load_teacher(name, state, img_size, timm_kwargs=kwargs, source=str(weights))


def recipe_features_dir(config, cache_folder: str | Path | None = None) -> Path:
    """Where a recipe's teacher tokens live: repa.features_dir, else beside its latent cache."""
    rc = config.repa
    if rc.features_dir:
        return Path(rc.features_dir)
    return features_dir(cache_folder or config.latent.cache, rc.teacher, rc.teacher_weights)


def build_recipe_features(config, images: Dataset, split: str, cache_folder: str | Path,
                          device: str | torch.device = "cpu") -> Path | None:
    """`usp cache-latents` for a recipe with REPA on cached tokens: the teacher's tokens of `images` (the cache's
    images, in its order, unaugmented) beside the latent cache. Skipped (None) when tokens made by this teacher
    for this cache already exist."""
    rc = config.repa
    if not rc.enabled or rc.features == "online":
        return None
    if config.data.normalize != "half":
        raise ValueError("REPA teacher tokens are made from images in [-1, 1] (data.normalize=half); the teacher "
                         "applies its own normalisation")
    teacher = load_repa_teacher(rc.teacher, rc.teacher_weights, rc.teacher_size)
    grid, folder = recipe_token_grid(config), recipe_features_dir(config, cache_folder)
    latents = LatentCacheDataset(cache_folder, split, config.latent.space, config.data.image_size, config.data.limit)
    try:
        RepaFeatureDataset(latents, folder, split, teacher, grid)
        return None  # already built by this teacher for this cache
    except (FileNotFoundError, ValueError):
        pass
    return build_features(teacher, images, latents, folder, split, grid, config.train.eval_batch, device)


class RepaFeatureDataset(Dataset):
    """The latent cache's items with their teacher tokens: {"moments", "label", "repa": (2, T, D) float32}."""

    def __init__(self, latents: LatentCacheDataset, folder: Path, split: str, teacher, grid: int):
        meta = folder / f"{split}.json"
        if not meta.is_file():
            raise FileNotFoundError(f"no REPA teacher tokens at {meta}; build them once with `usp cache-latents "
                                    "RECIPE` (it adds them beside the latents when repa.enabled)")
        made_by, wanted = json.loads(meta.read_text()), _made_by(teacher, latents, grid)
        if made_by["count"] < wanted["count"]:
            raise ValueError(f"{meta} holds {made_by['count']} items, the latent cache {wanted['count']}")
        made_by["count"] = wanted["count"]  # a data.limit below the cache's count reads a prefix
        differ = [f"{k}: {made_by.get(k)!r} (tokens) vs {v!r} (recipe)" for k, v in wanted.items()
                  if made_by.get(k) != v]
        if differ:
            raise ValueError(f"REPA teacher tokens {meta} were not made by this teacher / cache: {'; '.join(differ)}; "
                             "delete the folder to rebuild them")
        self.latents, self.path, self._array = latents, folder / f"{split}.npy", None

    @property
    def classes(self) -> list[int]:
        return self.latents.classes

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        if self._array is None:  # opened lazily: each DataLoader worker maps the file itself
            self._array = np.load(self.path, mmap_mode="r")
        return {**self.latents[index], "repa": torch.from_numpy(np.array(self._array[index], dtype=np.float32))}


class CachedLatentsWithImages(Dataset):
    """REPA with cached latents and the teacher online: each item is the cache's {"moments", "label"} and the
    image it was made from, {"image": (3, H, W)}, unflipped and cropped as the cache was (ADM centre crop for
    folders). The flip coin that picks the cached latent's orientation flips the image in the task, so the
    teacher sees the orientation of the latent it is aligned with (REPA's own loader pairs the two this way)."""

    def __init__(self, latents: LatentCacheDataset, images: Dataset):
        if len(images) != len(latents):
            raise ValueError(f"{len(images)} images for a latent cache of {len(latents)}: repa.features=online reads "
                             "the images the cache was made from (check data.root, data.limit, data.exclude)")
        self.latents, self.images = latents, images

    @property
    def classes(self) -> list[int]:
        return self.latents.classes

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        item, image = self.latents[index], self.images[index]
        if int(image["label"]) != item["label"]:
            raise ValueError(f"image {index} has label {image['label']} but the latent cache {item['label']}: these "
                             "are not the images the cache was made from (check data.root / data.limit)")
        return {**item, "image": image["image"]}


def cached_with_images(config, latents: LatentCacheDataset, split: str) -> CachedLatentsWithImages:
    """The latent cache of `split` paired with the recipe's images, transformed as `usp cache-latents` does."""
    from usp.data.images import build_image_dataset, build_transform
    from usp.latent.cache import cache_crop

    dc = config.data
    transform = build_transform(dc.image_size, cache_crop(dc.source), hflip=False, normalize=dc.normalize)
    images = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download, dc.exclude)
    return CachedLatentsWithImages(latents, images)

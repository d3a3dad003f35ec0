"""Latent cache: the raw posterior moments of every image and of its horizontal flip, computed once.

One file per split, `<split>.latents`: a 4 KiB JSON header, then a float32 array
(N, 2, 2C, h, w) — [plain, flipped] × [mean | logvar] — then int64 labels (N,). The header names the
latent space, the image size and the count, and `done` tells how many images are written, so an
interrupted `usp cache-latents` resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from usp.latent.vae import LatentSpace

HEADER_BYTES = 4096
FORMAT_VERSION = 1


def cache_path(folder: str | Path, split: str) -> Path:
    return Path(folder) / f"{split}.latents"


def read_header(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"latent cache {path} not found; create it with `usp cache-latents`")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    try:
        return json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not a usp latent cache (bad header); delete it and run `usp cache-latents`"
        ) from err


def _write_header(path: Path, header: dict) -> None:
    raw = json.dumps(header).encode()
    if len(raw) > HEADER_BYTES:
        raise ValueError("latent cache header too large")
    with open(path, "r+b") as f:
        f.write(raw.ljust(HEADER_BYTES, b"\0"))
        f.flush()


def _arrays(path: Path, header: dict, mode: str) -> tuple[np.memmap, np.memmap]:
    shape = (header["count"], 2, 2 * header["channels"], header["latent_size"], header["latent_size"])
    moments = np.memmap(path, dtype=np.float32, mode=mode, offset=HEADER_BYTES, shape=shape)
    labels = np.memmap(path, dtype=np.int64, mode=mode, offset=HEADER_BYTES + moments.nbytes, shape=(shape[0],))
    return moments, labels


def build_cache(dataset: Dataset, latent: LatentSpace, image_size: int, folder: str | Path, split: str,
                batch_size: int = 64, num_workers: int = 0, device: str = "cpu", progress: bool = True) -> Path:
    """Encode every image of `dataset` (items {"image": (3,H,W) in [-1,1], "label"}, no random
    augmentation) and its flip; resume a partial file of the same latent space and size."""
    latent_size = latent.check_image_size(image_size)
    path = cache_path(folder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = dict(version=FORMAT_VERSION, latent_space=latent.name, image_size=image_size, latent_size=latent_size,
                  channels=latent.channels, count=len(dataset), done=0)
    if path.exists():
        old = read_header(path)
        check_header(old, latent.name, image_size, path)
        if old["count"] != len(dataset):
            raise ValueError(f"{path} was made for {old['count']} images, the dataset has {len(dataset)}; "
                             "delete it to rebuild")
        header = old
        if header["done"] == header["count"]:
            return path
    else:
        with open(path, "wb") as f:
            f.truncate(HEADER_BYTES + len(dataset) * (2 * 2 * latent.channels * latent_size**2 * 4 + 8))
        _write_header(path, header)
    moments, labels = _arrays(path, header, "r+")
    start = header["done"]
    subset = torch.utils.data.Subset(dataset, range(start, len(dataset)))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    latent.to(device)
    bar = tqdm(total=len(dataset), initial=start, desc=f"cache {split}", disable=not progress, unit="img")
    for batch in loader:
        images = batch["image"].to(device)
        both = latent.moments(torch.cat([images, images.flip(-1)]))  # (2B, 2C, h, w)
        n = images.shape[0]
        moments[start : start + n] = torch.stack([both[:n], both[n:]], dim=1).float().cpu().numpy()
        labels[start : start + n] = batch["label"].numpy()
        start += n
        moments.flush()
        labels.flush()
        header["done"] = start  # only after the data is on disk: a crash re-encodes at most one batch
        _write_header(path, header)
        bar.update(n)
    bar.close()
    return path


def check_header(header: dict, latent_space: str, image_size: int, path: Path) -> None:
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has cache format {header.get('version')}, expected {FORMAT_VERSION}; rebuild it")
    if header["latent_space"] != latent_space or header["image_size"] != image_size:
        raise ValueError(
            f"{path} holds {header['latent_space']} latents of {header['image_size']} px images, but the recipe "
            f"asks for {latent_space} at {image_size} px; point latent.cache at a matching cache or rebuild it"
        )


class LatentCacheDataset(Dataset):
    """Items {"moments": (2, 2C, h, w) float32 [plain, flipped], "label": int}; memory-mapped."""

    def __init__(self, folder: str | Path, split: str, latent_space: str, image_size: int, limit: int | None = None):
        self.path = cache_path(folder, split)
        self.header = read_header(self.path)
        check_header(self.header, latent_space, image_size, self.path)
        if self.header["done"] < self.header["count"]:
            raise ValueError(f"{self.path} is incomplete ({self.header['done']}/{self.header['count']}); "
                             "run `usp cache-latents` again to finish it")
        self.count = self.header["count"] if limit is None else min(limit, self.header["count"])
        self._arrays = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if self._arrays is None:  # opened lazily, so each DataLoader worker maps the file itself
            self._arrays = _arrays(self.path, self.header, "r")
        moments, labels = self._arrays
        return {"moments": torch.from_numpy(np.array(moments[index])), "label": int(labels[index])}

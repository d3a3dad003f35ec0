"""Latent cache: the raw posterior moments of every image and of its horizontal flip, computed once.

One file per split, `<split>.latents`: a 4 KiB JSON header, then a float32 array
(N, 2, 2C, h, w) — [plain, flipped] × [mean | logvar] — then int64 labels (N,). The header names what
made the cache — the latent space, a hash of the VAE's weights, a hash of the latent normalisation (scale and
shift, per channel for VA-VAE), the image size, crop and image normalisation, the dataset folder and the image
count — and a run whose recipe differs in any of them is refused
(`verify_cache`). `done` tells how many images are written, so an interrupted `usp cache-latents` resumes
where it stopped. The file is allocated in full before the first write, so a full disk is an error up
front, not a SIGBUS in the middle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from usp import DiskFullError
from usp.latent.stats import write_cache_stats
from usp.latent.vae import LatentSpace, norm_fingerprint, scale_and_shift

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


def vae_fingerprint(latent: LatentSpace) -> str:
    """sha256 of the VAE's weights (names, dtypes, shapes, bytes): two VAEs of one space and size differ here."""
    h = hashlib.sha256()
    for key, value in sorted(latent.vae.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_crop(source: str) -> str:
    """The crop a cache is made with: ADM's centre crop for image folders (as DiT trains), plain centre else."""
    return "adm_center" if source == "folder" else "center"


def cache_source(config, split: str) -> dict:
    """What a recipe's images for `split` are: the fields of a cache header that must match the recipe."""
    from usp.data.fashion_mnist import find_folder

    dc = config.data
    if dc.source == "fashion_mnist":
        folder = find_folder(dc.root)
        root = str(folder.resolve()) if folder is not None else None
    else:
        root = str((Path(dc.root) / split).resolve()) if dc.root else None
    return {"source": dc.source, "root": root, "crop": cache_crop(dc.source), "normalize": dc.normalize,
            "limit": dc.limit}


def _allocate(path: Path, size: int) -> None:
    """Reserve `size` bytes on disk now (a sparse file would die of SIGBUS when the disk fills later)."""
    with open(path, "ab") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate: check below
                raise
        if shutil.disk_usage(path.parent).free < size - os.fstat(f.fileno()).st_size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.truncate(size)


def build_cache(dataset: Dataset, latent: LatentSpace, image_size: int, folder: str | Path, split: str,
                batch_size: int = 64, num_workers: int = 0, device: str = "cpu", progress: bool = True,
                source: dict | None = None) -> Path:
    """Encode every image of `dataset` (items {"image": (3,H,W) in [-1,1], "label"}, no random
    augmentation) and its flip; resume a partial file made the same way. `source`: `cache_source(...)`,
    stored in the header so a run can tell whether the cache was made from its data."""
    latent_size = latent.check_image_size(image_size)
    path = cache_path(folder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = getattr(dataset, "classes", None)
    header = dict(version=FORMAT_VERSION, latent_space=latent.name, image_size=image_size, latent_size=latent_size,
                  channels=latent.channels, count=len(dataset), done=0, vae_sha256=vae_fingerprint(latent),
                  norm_sha256=latent.norm_fingerprint,
                  num_classes=len(classes) if classes is not None else None, **(source or {}))
    size = HEADER_BYTES + len(dataset) * (2 * 2 * latent.channels * latent_size**2 * 4 + 8)
    fresh = not path.exists()
    if not fresh:
        old = read_header(path)
        check_header(old, latent.name, image_size, path)
        # Caches written before the normalisation was recorded are not refused for lacking it.
        recorded = ("count", "vae_sha256", *(("norm_sha256",) if "norm_sha256" in old else ()), *(source or {}))
        made_by = {k: old.get(k) for k in recorded}
        wanted = {k: header[k] for k in made_by}
        if made_by != wanted:
            differ = ", ".join(f"{k}: {made_by[k]} in the file vs {wanted[k]} now" for k in made_by
                               if made_by[k] != wanted[k])
            raise ValueError(f"{path} was made from other data, another VAE or other latent statistics ({differ}); "
                             "delete it to rebuild")
        header = old
        if header["done"] == header["count"]:
            write_cache_stats(path)  # per-channel statistics beside the cache (LightningDiT's), if not there yet
            return path
    try:
        _allocate(path, size)
    except OSError as err:
        if fresh:
            path.unlink(missing_ok=True)  # nothing of the user's was in it yet
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on the disk of {path.parent} for the latent cache {path.name}: it "
                                f"needs {size / 2**20:.1f} MiB, {shutil.disk_usage(path.parent).free / 2**20:.1f} "
                                "MiB are free; free some space or point --out at another disk") from err
        raise
    if fresh:
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
    write_cache_stats(path)  # per-channel statistics beside the cache (LightningDiT's), if not there yet
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

    draws_python_random = False  # SeededDataset need not seed Python's and NumPy's generators for it

    def __init__(self, folder: str | Path, split: str, latent_space: str, image_size: int, limit: int | None = None):
        self.path = cache_path(folder, split)
        self.header = read_header(self.path)
        check_header(self.header, latent_space, image_size, self.path)
        if self.header["done"] < self.header["count"]:
            raise ValueError(f"{self.path} is incomplete ({self.header['done']}/{self.header['count']}); "
                             "run `usp cache-latents` again to finish it")
        self.count = self.header["count"] if limit is None else min(limit, self.header["count"])
        self._arrays = None

    @property
    def classes(self) -> list[int]:
        """The class indices of the data the cache was made from (from its header, else from its labels)."""
        count = self.header.get("num_classes")
        if count is None:
            count = int(_arrays(self.path, self.header, "r")[1].max()) + 1
        return list(range(count))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if self._arrays is None:  # opened lazily, so each DataLoader worker maps the file itself
            self._arrays = _arrays(self.path, self.header, "r")
        moments, labels = self._arrays
        return {"moments": torch.from_numpy(np.array(moments[index])), "label": int(labels[index])}


def verify_cache(config, splits: list[str]) -> list[LatentCacheDataset]:
    """The caches of `splits`, refused unless complete and made from this recipe's VAE weights and images
    (naming both sides). Loads the recipe's VAE once to hash it. Caches written before fingerprints existed
    are used with a warning."""
    import logging

    lc, fingerprint, datasets = config.latent, None, []
    try:  # the statistics are small files (or constants): no VAE needs loading for them
        norm = norm_fingerprint(*scale_and_shift(lc.space, lc.path, lc.cache))
    except (OSError, ValueError):
        norm = ""  # the task reading the cache needs them and names the missing file itself
    for split in splits:
        dataset = LatentCacheDataset(lc.cache, split, lc.space, config.data.image_size, config.data.limit)
        datasets.append(dataset)
        path, header = dataset.path, dataset.header
        if "vae_sha256" not in header:
            logging.getLogger("usp").warning(f"warning: {path} was written before caches recorded their VAE and "
                                             "data; it cannot be checked against this recipe (rebuild it to be safe)")
            continue
        if fingerprint is None:
            try:
                fingerprint = vae_fingerprint(LatentSpace.load(lc.space, lc.path, cache=lc.cache))
            except (OSError, ValueError) as err:  # pretraining on a cache needs no VAE: do not demand one here
                logging.getLogger("usp").warning(f"warning: cannot load the recipe's VAE to check {path} against "
                                                 f"it ({' '.join(str(err).split())[:200]}); its VAE is unchecked")
                fingerprint = ""

        wanted = {**cache_source(config, split), **({"vae_sha256": fingerprint} if fingerprint else {}),
                  **({"norm_sha256": norm} if norm else {})}
        limit = wanted.pop("limit")
        # Only what the header records: `build_cache` called without `source` (the demo) records the VAE alone.
        differ = [f"{k} {header[k]!r} (cache) vs {wanted[k]!r} (recipe)" for k in wanted if k in header and
                  header[k] != wanted[k]]
        # A cache holds its whole split when made without a limit or when the split ran out before the limit.
        whole = header.get("limit") is None or header["count"] < header["limit"]
        if "limit" in header and not whole and (limit is None or limit > header["count"]):
            differ.append(f"{header['count']} images (cache) vs {limit or 'all'} (recipe data.limit)")
        if differ:
            what = ("the VAE weights differ" if any(d.startswith("vae_sha256") for d in differ) else
                    "the latent statistics differ" if any(d.startswith("norm_sha256") for d in differ) else
                    "the data differ")
            raise ValueError(f"latent cache {path} was not made from this recipe ({what}): {'; '.join(differ)}; "
                             "rebuild it with `usp cache-latents` and this recipe, or point latent.cache at a "
                             "matching one")
    return datasets


def cache_recipe(config, splits: list[str], folder: str | Path | None = None, batch_size: int | None = None,
                 device: str | None = None, progress: bool = True) -> dict[str, dict]:
    """`usp cache-latents`: encode the recipe's images of each split (the ADM centre crop for image folders, as DiT
    trains; no flip, the cache stores it) into `folder` (default latent.cache), with REPA's teacher tokens beside
    them when the recipe trains REPA on cached tokens -> {split: {"images", "path", "tokens" (None when off)}}.
    `device`: default cuda when there is one and the recipe does not ask for the CPU."""
    from usp.data.images import build_image_dataset, build_transform
    from usp.latent.features import build_recipe_features

    lc, dc = config.latent, config.data
    folder = folder or lc.cache
    if folder is None:
        raise ValueError("no cache folder: give --out DIR or set latent.cache in the recipe")
    if device is None:
        device = "cuda" if torch.cuda.is_available() and config.run.device != "cpu" else "cpu"
    latent = LatentSpace.load(lc.space, lc.path, cache=folder,  # per-channel statistics: computed into the cache
                              max_batch=lc.vae_batch)
    batch_size = batch_size or lc.vae_batch  # images per batch (the VAE sees them and their flips in vae_batch calls)
    latent.check_image_size(dc.image_size)
    transform = build_transform(dc.image_size, cache_crop(dc.source), hflip=False, normalize=dc.normalize)
    made = {}
    for split in splits:
        dataset = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download, dc.exclude)
        path = build_cache(dataset, latent, dc.image_size, folder, split, batch_size, dc.num_workers, device,
                           progress=progress, source=cache_source(config, split))
        made[split] = {"images": len(dataset), "path": path,
                       "tokens": build_recipe_features(config, dataset, split, folder, device)}
    return made


def cache_latents_command(config, splits: list[str], out: str | None = None, batch_size: int | None = None) -> None:
    """`usp cache-latents RECIPE`: `cache_recipe`, reported one line per split (and its REPA tokens)."""
    for split, made in cache_recipe(config, splits, out, batch_size).items():
        print(f"{split}: {made['images']} images -> {made['path']}")
        if made["tokens"]:
            print(f"{split}: REPA teacher tokens -> {made['tokens']}")

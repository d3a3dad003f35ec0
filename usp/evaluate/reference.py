"""ADM-format NPZ batches (reference and samples) and the evaluation of one against the other.

The format is the one of ADM's evaluator and its published reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`):

| key      | content |
| -------- | ------- |
| `arr_0`  | uint8 images (N, H, W, 3) |
| `arr_1`  | optional int64 labels (N,) (ADM's sampling scripts; `label` is read too) |
| `mu`, `sigma`     | optional precomputed pool3 statistics (2048,), (2048, 2048) |
| `mu_s`, `sigma_s` | optional precomputed spatial (sFID) statistics (2023,), (2023, 2023) |

When the reference holds `mu` it is used for FID and sFID instead of statistics of its images, as ADM does;
precision and recall always need the reference images' features. `arr_0` is streamed from the archive batch
by batch, so a 50K x 256² sample file is never loaded whole.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from usp.data.images import IMAGE_EXTENSIONS, adm_center_crop
from usp.evaluate.inception import InceptionFeatures, InceptionOutputs
from usp.evaluate.metrics import compute_statistics, frechet_distance, inception_score, precision_recall

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


def _npz_member(path: str | os.PathLike, key: str) -> tuple[zipfile.ZipFile, str]:
    archive = zipfile.ZipFile(path)
    name = f"{key}.npy"
    if name not in archive.namelist():
        keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
        archive.close()
        raise KeyError(f"{path} has no array {key!r}; it holds {keys}")
    return archive, name


def npz_keys(path: str | os.PathLike) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted(n.removesuffix(".npy") for n in archive.namelist())


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of an open .npy stream, or None for a format version numpy reads only whole."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def npz_array_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an NPZ, read from its header only when possible."""
    archive, name = _npz_member(path, key)
    with archive, archive.open(name) as f:
        header = _read_header(f)
    if header is None:
        with np.load(path) as data:
            return data[key].shape, data[key].dtype
    return tuple(header[0]), header[2]


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 50) -> Iterator[np.ndarray]:
    """Yield `path[key]` in batches along axis 0 without loading it whole (C-order plain dtypes are streamed;
    anything else falls back to one `np.load`)."""
    archive, name = _npz_member(path, key)
    with archive, archive.open(name) as f:
        header = _read_header(f)
        if header is None or header[1] or header[2].hasobject or len(header[0]) == 0:
            with np.load(path) as data:
                array = data[key]
            for i in range(0, len(array), batch_size):
                yield array[i : i + batch_size]
            return
        shape, _, dtype = header
        for start in range(0, shape[0], batch_size):
            batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), dtype=dtype)
            view, filled = memoryview(batch).cast("B"), 0  # read straight into a writable array
            while filled < batch.nbytes:
                got = f.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{path}:{key} is truncated at row {start} of {shape[0]}")
                filled += got
            yield batch


def read_npz_stats(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The precomputed `mu, sigma, mu_s, sigma_s` of an ADM batch, or None when it has none."""
    keys = set(npz_keys(path))
    if "mu" not in keys:
        return None
    missing = [k for k in STAT_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path} holds 'mu' but not {missing}; ADM batches carry all of {list(STAT_KEYS)}")
    with np.load(path) as data:
        return {k: data[k] for k in STAT_KEYS}


def read_npz_labels(path: str | os.PathLike) -> np.ndarray | None:
    """Labels (N,) of a sample batch (`arr_1`, or `label`), or None."""
    keys = set(npz_keys(path))
    for key in ("arr_1", "label"):
        if key in keys:
            with np.load(path) as data:
                return data[key]
    return None


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM batches hold uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def write_sample_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write samples as ADM's sampling scripts do: `arr_0` uint8 (N, H, W, 3), `arr_1` labels (N,) if given."""
    arrays = {"arr_0": _check_images(images)}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be ({len(images)},), got {labels.shape}")
        arrays["arr_1"] = labels
    return _savez(path, arrays)


def write_reference_npz(
    path: str | os.PathLike, images: np.ndarray | None = None, stats: dict[str, np.ndarray] | None = None
) -> Path:
    """Write a reference batch: `arr_0` images and/or the four statistics `mu, sigma, mu_s, sigma_s`."""
    if images is None and stats is None:
        raise ValueError("a reference batch needs images, statistics or both")
    arrays = {} if images is None else {"arr_0": _check_images(images)}
    if stats is not None:
        missing = [k for k in STAT_KEYS if k not in stats]
        if missing:
            raise ValueError(f"statistics lack {missing}; need all of {list(STAT_KEYS)}")
        arrays.update({k: np.asarray(stats[k]) for k in STAT_KEYS})
    return _savez(path, arrays)


def _savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a half-written batch never carries the final name
    return path


def inception_stats(features: InceptionOutputs) -> dict[str, np.ndarray]:
    """ADM's four statistics of a batch's features: pool3 (`mu, sigma`) and spatial (`mu_s, sigma_s`)."""
    mu, sigma = compute_statistics(features.pool)
    mu_s, sigma_s = compute_statistics(features.spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def reference_batch_from_folder(
    folder: str | os.PathLike,
    out_path: str | os.PathLike,
    image_size: int,
    num_images: int | None = None,
    seed: int = 0,
    extractor: InceptionFeatures | None = None,
    batch_size: int = 50,
    exclude: set[Path] | None = None,
) -> Path:
    """Write a reference NPZ from the images under `folder` (searched recursively), each centre-cropped as ADM
    (`usp.data.images.adm_center_crop`) to `image_size`². With `num_images`, a random subset drawn with `seed`
    (ADM's ImageNet references are 10K random training images). With `extractor`, the Inception statistics are
    stored too, so later evaluations skip the reference's FID/sFID features. Files in `exclude` (resolved paths,
    e.g. `data.exclude`) and files that do not decode are left out and listed on stderr, never skipped silently."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; give a folder of images (searched recursively)")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {e.lower() for e in IMAGE_EXTENSIONS}
                   and p.resolve() not in (exclude or set()))
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
    if num_images is not None and num_images > len(files):
        raise ValueError(f"num_images={num_images} but {folder} holds only {len(files)} images")
    # A random order drawn with `seed`, read until num_images decode: a bad file is replaced by the next one.
    order = np.random.default_rng(seed).permutation(len(files)) if num_images is not None else range(len(files))
    wanted = num_images  # None: every image that decodes
    picked, bad = {}, []
    for index in order:
        try:
            with Image.open(files[index]) as image:
                picked[int(index)] = np.asarray(adm_center_crop(image.convert("RGB"), image_size))
        except Exception as err:  # PIL raises several types for broken files
            bad.append(f"{files[index]}: {type(err).__name__}: {err}")
        if len(picked) == wanted:
            break
    if bad:
        print(f"reference: left out {len(bad)} unreadable files:\n  " + "\n  ".join(bad), file=sys.stderr)
    if not picked or (wanted is not None and len(picked) < wanted):
        raise ValueError(f"{folder}: only {len(picked)} of {len(files)} images decode, fewer than the "
                         f"{wanted or 1} needed; replace the files listed above")
    images = np.stack([picked[i] for i in sorted(picked)])
    stats = None if extractor is None else inception_stats(extractor.extract(images, batch_size))
    return write_reference_npz(out_path, images, stats)


def _features(path: str | os.PathLike, extractor: InceptionFeatures, batch_size: int, progress: bool):
    shape, dtype = npz_array_shape(path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), found {dtype} {shape}")
    return extractor.extract(iter_npz_batches(path, "arr_0", batch_size), batch_size, progress, total=shape[0])


def evaluate_npz(
    ref_path: str | os.PathLike,
    sample_path: str | os.PathLike,
    extractor: InceptionFeatures,
    batch_size: int = 50,
    progress: bool = False,
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm",
) -> dict[str, float]:
    """ADM's five metrics of the samples in `sample_path` against the reference `ref_path`:
    `fid`, `sfid` (against the reference's stored statistics when it has them), `inception_score` (of the
    samples), `precision`, `recall` (NaN when the reference has statistics but no images).
    `fd_method`: see `frechet_distance` ("sqrtm" is ADM's; "eigh" the same value, faster)."""
    sample = _features(sample_path, extractor, batch_size, progress)
    if len(sample) < 2:
        raise ValueError(f"{sample_path} holds {len(sample)} images; the metrics need at least 2")
    ref_stats = read_npz_stats(ref_path)
    ref = _features(ref_path, extractor, batch_size, progress) if "arr_0" in npz_keys(ref_path) else None
    if ref_stats is None:
        if ref is None:
            raise ValueError(f"{ref_path} has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
        ref_stats = inception_stats(ref)
    sample_stats = inception_stats(sample)
    # ADM: sample_stats.frechet_distance(ref_stats), i.e. the samples as the first argument
    fid = frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"],
                           matrix_sqrt=fd_method)
    sfid = frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"],
                            matrix_sqrt=fd_method)
    precision = recall = math.nan
    if ref is not None:
        precision, recall = precision_recall(ref.pool, sample.pool, device=str(extractor.device))
    return {
        "fid": fid,
        "sfid": sfid,
        "inception_score": inception_score(sample.logits, kind="logits"),
        "precision": precision,
        "recall": recall,
    }


def write_metrics_json(path: str | os.PathLike, metrics: dict[str, float], **meta: object) -> Path:
    """Write `metrics` (and `meta`, e.g. the input paths) as indented JSON; NaN is written as null."""
    record = {**meta, **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A two-column text table of `metrics`, one row per key."""
    width = max(len(k) for k in metrics)
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    rows += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()]
    return "\n".join(rows)


def evaluate_command(
    ref: str | os.PathLike,
    samples: str | os.PathLike,
    out: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | None = None,
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm",
) -> dict[str, float]:
    """`usp evaluate REF.npz SAMPLES.npz`: ADM's metrics, printed as a table and written to `out` (JSON).
    `device`: default cuda when there is one."""
    for name, path in (("reference", ref), ("samples", samples)):  # before Inception loads (slow)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} batch {path} not found; write one with `usp reference DIR --out "
                                    f"ref.npz` or `usp sample`")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = InceptionFeatures.from_weights(inception_weights, device=device)
    metrics = evaluate_npz(ref, samples, extractor, batch_size=batch_size, progress=True, fd_method=fd_method)
    print(format_metrics_table(metrics))
    if out is not None:
        write_metrics_json(out, metrics, ref=str(ref), samples=str(samples), fd_method=fd_method)
    return metrics


def reference_command(folder: str, out: str, image_size: int = 256, num: int | None = None, seed: int = 0) -> None:
    """`usp reference FOLDER --out REF.npz`: `reference_batch_from_folder`."""
    print(f"wrote {reference_batch_from_folder(folder, out, image_size, num_images=num, seed=seed)}")

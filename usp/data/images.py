"""Image datasets and transforms: ImageNet-layout folders and Fashion-MNIST, one item format.

Every dataset returns `{"image": (3, H, W) float in the recipe's normalisation, "label": int}`.
Per-sample randomness (crops, flips) is drawn from a seed that the sampler hands over with the
index (see `usp.data.sampler`), so an item does not depend on worker count, rank or resumption.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from usp.data.fashion_mnist import load_fashion_mnist

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".JPEG")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX filtering while the short side is ≥ 2·size, resize with
    BICUBIC so the short side is `size`, then crop the centre square (what DiT/ADM train and evaluate on)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(s * ratio) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return Image.fromarray(array[top : top + size, left : left + size])


def build_transform(image_size: int, crop: str, crop_scale: tuple[float, float] = (0.2, 1.0),
                    hflip: bool = True, normalize: str = "half") -> T.Compose:
    """crop: random_resized (MAE/USP pretraining), adm_center (DiT fine-tuning), center (evaluation)."""
    if crop == "random_resized":
        steps = [T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
    elif crop == "adm_center":
        steps = [T.Lambda(lambda im: adm_center_crop(im, image_size))]
    elif crop == "center":
        steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown crop {crop!r}; choose random_resized, adm_center or center")
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    mean, std = ((0.5,) * 3, (0.5,) * 3) if normalize == "half" else (IMAGENET_MEAN, IMAGENET_STD)
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class ImageFolderDataset(Dataset):
    """root/class_name/*.jpg (ImageNet layout: point `root` at the split folder, e.g. .../train)."""

    def __init__(self, root: str | os.PathLike, transform=None, limit: int | None = None,
                 exclude: set[Path] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist; set data.root to a folder of class folders")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"data folder {root} has no class sub-folders; expected root/<class>/<image>.jpg")
        self.classes = classes
        per_class = [[path for path in sorted((root / name).rglob("*"))
                      if path.suffix in IMAGE_EXTENSIONS or path.suffix.lower() in IMAGE_EXTENSIONS]
                     for name in classes]
        self.samples = [(path, label) for label, paths in enumerate(per_class) for path in paths]
        if exclude:  # bad files found by `usp init` (data.exclude): listed there, counted here, never silent
            kept = [(p, label) for p, label in self.samples if p.resolve() not in exclude]
            if len(kept) < len(self.samples):
                logging.getLogger(__name__).warning("%s: %d files left out (listed in data.exclude)", root,
                                                    len(self.samples) - len(kept))
            self.samples = kept
        if not self.samples:
            raise ValueError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)")
        empty = [name for name, paths in zip(classes, per_class) if not paths]
        if empty:  # still labels (the splits must agree on the label of each folder), but never silently
            logging.getLogger(__name__).warning(
                "data folder %s: %d class folder(s) hold no images: %s; add their images or remove the folders "
                "from every split", root, len(empty), ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        if limit is not None:
            self.samples = self.samples[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL raises several types for broken files
            raise ValueError(f"cannot read image {path}: {err}; remove or replace the file") from err

    def __getitem__(self, index: int) -> dict:
        image = self.load(index)
        return {"image": self.transform(image) if self.transform else image, "label": self.samples[index][1]}


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as 32×32 RGB PIL images (28×28 grey, padded by 2 px of black), then the transform."""

    def __init__(self, root: str | None = None, split: str = "train", transform=None,
                 limit: int | None = None, download: bool = False):
        if split not in ("train", "test", "val"):
            raise ValueError(f"Fashion-MNIST has splits train and test (val = test), not {split!r}; "
                             "set data.split / data.eval_split")
        images, labels = load_fashion_mnist(root, "test" if split in ("test", "val") else "train", download)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        self.labels = labels
        self.classes = list(range(10))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int) -> dict:
        image = self.load(index)
        return {"image": self.transform(image) if self.transform else image, "label": int(self.labels[index])}


def read_exclude(path: str | os.PathLike | None) -> set[Path]:
    """The resolved paths listed in a `data.exclude` file (text after `#` is a comment)."""
    if path is None:
        return set()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.exclude list {path} not found; rerun `usp init` or set data.exclude=null")
    entries = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {Path(entry).resolve() for entry in entries if entry}


def build_image_dataset(source: str, root: str | None, split: str, transform=None,
                        limit: int | None = None, download: bool = False, exclude: str | None = None) -> Dataset:
    """`exclude`: a list file of images to leave out (data.exclude, written by `usp init`); folders only."""
    if source == "fashion_mnist":
        return FashionMNISTDataset(root, split, transform, limit, download)
    if root is None:
        raise ValueError("data.root is not set; point it at an ImageNet-layout folder (root/<split>/<class>/*.jpg)")
    return ImageFolderDataset(Path(root) / split, transform, limit, read_exclude(exclude))


def check_num_classes(num_classes: int, dataset: Dataset) -> None:
    """model.num_classes against the classes of the data: too few is an error (labels would index past the
    head or the class embedding), too many a warning (unused outputs)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return
    if num_classes < len(classes):
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(classes)} classes; "
                         f"set model.num_classes={len(classes)}")
    if num_classes > len(classes):
        import logging

        logging.getLogger("usp").warning(f"warning: model.num_classes={num_classes} but the data has {len(classes)} "
                                         "classes; the extra outputs are never trained")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounding as ADM/DiT do."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

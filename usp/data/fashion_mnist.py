"""Fashion-MNIST from its IDX files: the embedded default's data.

Looked for, in order: an explicit folder, `$USP_FASHION_MNIST`, Debian's `dataset-fashion-mnist`
package folder, then torchvision's download (only when `download=True`).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} bytes, found {payload.size}")
    return payload.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def find_folder(root: str | os.PathLike | None = None) -> Path | None:
    # An explicit root is the only place looked at: falling back to another copy would train on other data.
    candidates = [Path(root)] if root else []
    if not root and os.environ.get("USP_FASHION_MNIST"):
        candidates.append(Path(os.environ["USP_FASHION_MNIST"]))
    if not root:
        candidates.append(DEBIAN_FOLDER)
    for folder in candidates:
        if _find(folder, _FILES["train"][0]) and _find(folder, _FILES["test"][0]):
            return folder
        raw = folder / "FashionMNIST" / "raw"  # torchvision's layout
        if _find(raw, _FILES["train"][0]):
            return raw
    return None


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of one split ('train' or 'test')."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = find_folder(root)
    if folder is None and download:
        import torchvision

        target = Path(root or Path.home() / ".cache" / "usp" / "fashion-mnist")
        torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
        folder = find_folder(target)
    if folder is None and root:
        raise FileNotFoundError(f"data.root={root} holds no Fashion-MNIST IDX files ({_FILES['train'][0]}.gz, ...); "
                                "fix data.root, or unset it to use the installed copy")
    if folder is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
            f"(puts it in {DEBIAN_FOLDER}), set USP_FASHION_MNIST to a folder holding the IDX files, "
            "or pass download=True (data.download=true in a recipe) on a machine that is online."
        )
    images = _read_idx(_find(folder, _FILES[split][0]))
    labels = _read_idx(_find(folder, _FILES[split][1])).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def to_rgb32(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) grey -> float (N, 3, 32, 32) in [-1, 1]: zero-padded by 2 px, grey copied to RGB."""
    x = torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

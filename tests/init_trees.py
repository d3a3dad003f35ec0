"""Small ImageFolder trees for the `usp init` tests, written from a seed (no dataset needed), and the cases the
recipe writer is checked on. Shared by tests/test_init_recipes.py and the script that wrote the old writer's
resolved recipes (tests/snapshots/init_recipes_ff75de9.json) from commit ff75de9."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# case -> (image side, classes, train images per class, val images per class, `usp init` options)
CASES = {
    "fmnist32": (32, 4, 60, 15, []),  # Fashion-MNIST-like: 32-px greys, one corrupt file, one empty class
    "fmnist32_noflip_16px": (32, 4, 60, 15, ["--no-flip", "--image-size", "16"]),
    "large144": (144, 3, 40, 10, []),  # from 128 px: SD-VAE, model size b
    "many": (32, 3, 700, 10, []),  # enough images for the batch to reach 128 and the step clamps to move
}


def write_tree(root: Path, side: int, classes: int, train: int, val: int, seed: int = 0) -> Path:
    """root/{train,val}/{class0..,zz_empty}/*.png of seeded noise (grey, `side` px) plus one corrupt PNG in
    train/class1; the empty class sorts last, so the image classes keep labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (root / split / "zz_empty").mkdir()
    (root / "train" / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def normalise(value, tmp: str):
    """A resolved recipe with the temporary folder replaced by <TMP> (so runs in other folders compare)."""
    if isinstance(value, dict):
        return {k: normalise(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, tmp) for v in value]
    return value.replace(tmp, "<TMP>") if isinstance(value, str) else value

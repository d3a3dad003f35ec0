"""`usp demo --data DIR`: the Fashion-MNIST demo's pipeline and report on your own ImageFolder tree.

It is `usp init` (scan, summary, recipes under OUT/recipes) followed by the demo's stages run from those recipes:
small VAE (below 128 px), latent cache of the training and evaluation splits, a domain classifier trained on your
classes, USP pretraining, DiT and SiT from USP and from scratch (same budget and seed), and the frozen-feature
probe. The real side of the domain FD is a reference batch of the evaluation split (ADM centre crop, the bad files
left out and listed). The stages are the `Demo` class's; only where the data comes from differs (hooks below).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from usp.config import Config, load_config
from usp.demo.pipeline import Demo
from usp.demo.report import ReportData
from usp.recipe_tools.init import init_recipes

# (full, quick) budgets. Steps, not epochs: the stages cost the same on 300 or 30 000 images, and the quick run
# only checks the plumbing. Full: the Fashion-MNIST demo's step counts.
BUDGET = {
    "images": (None, None),  # every usable training image
    "vae_steps": (200, 15),
    "pretrain_steps": (300, 10),
    "finetune_steps": (250, 8),
    "eval_every": (50, 4),
    "eval_samples": (400, 50),
    "domain_steps": (400, 20),
    "probe_train": (None, None),
}
DOMAIN_SIDE = 32  # the domain classifier (usp.evaluate.domain.DomainCNN) reads 32×32 images


class OwnDataDemo(Demo):
    """`Demo` with the recipes of `usp init` and the user's images in place of Fashion-MNIST."""

    def __init__(self, data: str | Path, out: Path, quick: bool, seed: int, image_size: int | None = None,
                 flip: bool = True):
        super().__init__(out, quick, seed)
        self.scan, self.choices, _ = init_recipes(data, out, image_size=image_size, flip=flip)
        print(self.scan.table(), flush=True)
        self.recipes = out / "recipes"
        self.reference_text = f"the {self.scan.splits[self.scan.eval_split].images} images of the evaluation split"
        (out / "scan.json").write_text(json.dumps({
            "root": str(self.scan.root), "classes": self.scan.classes, "empty_classes": self.scan.empty_classes,
            "bad_files": [[str(p), why] for p, why in self.scan.bad_files],
            "splits": {s.name: s.classes for s in self.scan.splits.values()}}, indent=1))
        self._arrays: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def budget(self, key: str) -> int | None:
        return BUDGET[key][1 if self.quick else 0]

    def recipe(self, name: str, *overrides: str) -> Config:
        common = [f"run.out_dir={self.runs}", f"run.seed={self.seed}", "train.progress=false",
                  "train.tensorboard=false", "data.num_workers=0"]
        return load_config(self.recipes / f"{name}.yaml", [*common, *overrides])

    @property
    def vae_dir(self) -> Path:
        # Below 128 px the demo trains the small VAE into OUT/vae; from 128 px the recipes' SD-VAE is used as is.
        return self.out / "vae" if self.choices.small_vae else Path(self.recipe("pretrain").latent.path)

    def latent_overrides(self) -> list[str]:
        return []  # the recipes of `usp init` name the VAE and the cache already

    def cache(self) -> dict:
        from usp.latent.cache import cache_recipe

        config = self.recipe("pretrain")
        made = cache_recipe(config, [config.data.split, config.data.eval_split], batch_size=250, progress=False)
        return {"train": made[config.data.split]["images"], "test": made[config.data.eval_split]["images"]}

    def images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All usable images of a split as float (N, 3, 32, 32) in [-1, 1] and their labels (N,): the inputs of
        the domain classifier and the raw-pixel probe (read once)."""
        if split not in self._arrays:
            from usp.data.images import build_image_dataset, build_transform

            dc = self.recipe("pretrain").data
            dataset = build_image_dataset("folder", dc.root, split, build_transform(DOMAIN_SIDE, "center", hflip=False),
                                          exclude=dc.exclude)
            items = [dataset[i] for i in range(len(dataset))]
            self._arrays[split] = (torch.stack([item["image"] for item in items]),
                                   torch.tensor([item["label"] for item in items]))
        return self._arrays[split]

    def domain(self) -> dict:
        from usp.evaluate.domain import train_domain_cnn

        x, y = self.images(self.scan.train_split)
        test_x, test_y = self.images(self.scan.eval_split)
        _, accuracy = train_domain_cnn(x, y, test_x, test_y, self.out / "domain.safetensors",
                                       self.budget("domain_steps"), num_classes=self.choices.num_classes,
                                       seed=self.seed, batch_size=64)
        return {"test_accuracy": accuracy}

    @property
    def domain_reference(self) -> Path:
        """The real side of the domain FD: the evaluation split, ADM centre crop at the training size (written once)."""
        path = self.out / "domain_reference.npz"
        if not path.exists():
            from usp.data.images import read_exclude
            from usp.evaluate.reference import reference_batch_from_folder

            dc = self.recipe("pretrain").data
            reference_batch_from_folder(Path(dc.root) / dc.eval_split, path, dc.image_size,
                                        exclude=read_exclude(dc.exclude))
        return path

    def raw_pixel_probe(self, limit: int | None) -> dict:
        from usp.evaluate.probes import fast_protocol, logistic_regression

        (x, y), (test_x, test_y) = self.images(self.scan.train_split), self.images(self.scan.eval_split)
        start = time.perf_counter()
        raw = logistic_regression(x.flatten(1), y, test_x.flatten(1), test_y)
        features = {"layer": "none", "pooling": "none", "norm": f"raw {DOMAIN_SIDE}×{DOMAIN_SIDE} pixels, standardised"}
        return {"logistic_top1": raw["top1"], "seconds": time.perf_counter() - start,
                "protocol": fast_protocol(features, len(x), None)}

    def check_data(self) -> None:
        """Nothing left to check: the scan in __init__ read the whole tree."""

    @property
    def trains_vae(self) -> bool:
        return self.choices.small_vae

    def report_data(self) -> ReportData:
        """What the report says of this data: its name, recipes and classes, the scan summary first."""
        c, evaluation = self.choices, self.scan.eval_split
        return ReportData(
            name=self.scan.root.resolve().name, recipes=f"`{self.recipes}/*.yaml` (`usp init`)",
            num_classes=c.num_classes,
            test_images=f"all {self.scan.splits[evaluation].images} images of the {evaluation} split",
            vae=None if c.small_vae else f"{c.latent_space}, pretrained (not trained here)",
            preface=("", "## Data (`usp init` scan)", "", "```", self.scan.table(), "```", "",
                     f"{c.image_size} px, latent space {c.latent_space}, {c.num_classes} classes; "
                     f"recipes in `{self.recipes}`."))

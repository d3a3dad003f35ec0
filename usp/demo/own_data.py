"""`usp demo --data DIR`: the Fashion-MNIST demo's pipeline and report on your own ImageFolder tree.

It is `usp init` (scan, summary, recipes under OUT/recipes) followed by the demo's stages run from those recipes:
small VAE (below 128 px), latent cache of the training and evaluation splits, a domain classifier trained on your
classes, USP pretraining, DiT and SiT from USP and from scratch (same budget and seed), and the frozen-feature
probe. The real side of the domain FD is a reference batch of the evaluation split (ADM centre crop, the bad files
left out and listed). The stages are the `Demo` class's; only where the data comes from differs (hooks below).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from usp.config import Config, load_config
from usp.demo.init import init_recipes
from usp.demo.pipeline import Demo, arms

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
        self.scan, self.data_plan, _ = init_recipes(data, out, image_size=image_size, flip=flip)
        print(self.scan.table(), flush=True)
        self.recipes = out / "recipes"
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
        return self.out / "vae" if self.data_plan.small_vae else Path(self.recipe("pretrain").latent.path)

    def latent_overrides(self) -> list[str]:
        return []  # the recipes of `usp init` name the VAE and the cache already

    def cache(self) -> dict:
        from usp.data.images import build_image_dataset, build_transform
        from usp.latent.cache import build_cache
        from usp.latent.vae import LatentSpace

        config = self.recipe("pretrain")
        dc = config.data
        latent = LatentSpace.load(config.latent.space, config.latent.path)
        transform = build_transform(dc.image_size, "adm_center", hflip=False, normalize=dc.normalize)
        counts = {}
        for key, split in (("train", dc.split), ("test", dc.eval_split)):
            dataset = build_image_dataset("folder", dc.root, split, transform, exclude=dc.exclude)
            build_cache(dataset, latent, dc.image_size, config.latent.cache, split, batch_size=250, progress=False)
            counts[key] = len(dataset)
        return counts

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
        x, y = self.images(self.scan.train_split)
        test_x, test_y = self.images(self.scan.eval_split)
        accuracy = train_domain_cnn(x, y, test_x, test_y, self.data_plan.num_classes, self.out / "domain.safetensors",
                                    steps=self.budget("domain_steps"), seed=self.seed)
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

    def run(self) -> Path:
        from usp.demo.report import write_report

        if self.data_plan.small_vae:
            results = {"vae": self.stage("vae", self.vae)}
        else:
            results = {"vae": {"psnr_test": math.nan, "scale": None, "steps": 0, "seconds": 0.0}}
        results["cache"] = self.stage("cache", self.cache)
        results["domain"] = self.stage("domain", self.domain)
        results["pretrain"] = self.stage("pretrain", self.pretrain)
        weights = results["pretrain"]["weights"]
        for arm in arms(self.plan, self.seed):  # the demo's arms: SiT from USP, from scratch at two seeds
            results[arm.key] = self.stage(arm.key, lambda arm=arm: self.generate(arm, weights))
        results["probe"] = self.stage("probe", lambda: self.probe(weights))
        report = write_report(self.out, results, mode="quick" if self.quick else "default", seed=self.seed)
        return self.retitle(report)

    def retitle(self, report: Path) -> Path:
        """The shared report speaks of Fashion-MNIST: name the user's data, and put the scan summary first."""
        name = self.scan.root.resolve().name
        text = report.read_text().replace("Fashion-MNIST", name).replace("`configs/fmnist/*.yaml`",
                                                                         f"`{self.recipes}/*.yaml` (`usp init`)")
        # The shared report assumes Fashion-MNIST's 10 classes for chance-level class agreement.
        text = text.replace("(chance 0.10)", f"(chance {1 / self.data_plan.num_classes:.2f})")
        if not self.data_plan.small_vae:
            text = text.replace("| small VAE (f4, 8 ch) | 0.0 | test PSNR nan dB |",
                                f"| VAE | 0 | {self.data_plan.latent_space}, pretrained (not trained here) |")
        title, _, rest = text.partition("\n")
        plan = self.data_plan
        summary = ["", "## Data (`usp init` scan)", "", "```", self.scan.table(), "```", "",
                   f"{plan.image_size} px, latent space {plan.latent_space}, {plan.num_classes} classes; "
                   f"recipes in `{self.recipes}`."]
        report.write_text("\n".join([title, *summary, rest]))
        (self.out / "scan.json").write_text(json.dumps({
            "root": str(self.scan.root), "classes": self.scan.classes, "empty_classes": self.scan.empty_classes,
            "bad_files": [[str(p), why] for p, why in self.scan.bad_files],
            "splits": {s.name: s.classes for s in self.scan.splits.values()}}, indent=1))
        return report


def train_domain_cnn(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                     out_path: Path, steps: int, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> float:
    """Train `DomainCNN` on (N, 3, 32, 32) images in [-1, 1] with labels (N,) for `steps` Adam steps (one-cycle lr),
    save it with `num_classes` in its metadata (what `DomainEvaluator.load` builds) -> accuracy on the test images."""
    from safetensors.torch import save_file

    from usp.evaluate.domain import FEATURE_DIM, DomainCNN

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DomainCNN(num_classes=num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path),
              metadata={"test_accuracy": f"{accuracy:.6f}", "steps": str(steps), "seed": str(seed),
                        "dataset": "folder", "feature_dim": str(FEATURE_DIM), "num_classes": str(num_classes),
                        "train_images": str(len(x))})
    return accuracy


def run_own_data_demo(data: str | Path, out: str | Path = "demo_out", quick: bool = False, seed: int = 0,
                      image_size: int | None = None, flip: bool = True) -> Path:
    """`usp demo --data DIR`: scan and recipes (as `usp init`), the demo's stages, report.md under `out`."""
    return OwnDataDemo(data, Path(out), quick, seed, image_size, flip).run()


__all__ = ["OwnDataDemo", "run_own_data_demo", "train_domain_cnn"]

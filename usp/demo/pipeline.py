"""`usp demo`: the whole method on Fashion-MNIST on one CPU, with the recipes a user runs on ImageNet.

Stages (each skipped when its result file exists, so an interrupted demo resumes):
  vae       train the small f4 VAE (its test PSNR)            usp train-vae configs/fmnist/vae.yaml
  cache     latent moments of train/test (+ flips)            usp cache-latents ...
  domain    the domain classifier for FD / class agreement    (not Inception FID)
  pretrain  USP masked latent modeling + restoration grid      usp pretrain configs/fmnist/pretrain.yaml
  generate  DiT and SiT, from USP and from scratch, same budget and seed, sampled and scored at checkpoints
  probe     frozen-feature probe: USP vs random init vs raw pixels
  report    report.md with tables, curves and grids
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from usp.config import Config, load_config, recipes_dir

CONFIGS = recipes_dir() / "fmnist"  # the source tree's configs/, or the copy an installed wheel ships
GENERATORS = ("dit_usp", "dit_scratch", "sit_usp", "sit_scratch")

# Budgets: (full, quick). The quick run checks the plumbing end to end; its numbers mean little.
BUDGET = {
    "images": (30000, 2000),  # train images (of 60 000) cached and used by the latent stages
    "test_images": (None, 500),  # test images cached (None: all 10 000)
    "vae_steps": (200, 15),
    "pretrain_steps": (300, 10),
    "finetune_steps": (250, 8),
    "eval_every": (50, 4),
    "eval_samples": (400, 50),
    "domain_epochs": (2, 1),
    "probe_train": (10000, 500),
}


class Demo:
    def __init__(self, out: Path, quick: bool, seed: int):
        self.out, self.quick, self.seed = out, quick, seed
        self.runs, self.latents = out / "runs", out / "latents"
        self.stage_dir = out / "stages"
        self.stage_dir.mkdir(parents=True, exist_ok=True)

    def budget(self, key: str) -> int:
        return BUDGET[key][1 if self.quick else 0]

    def recipe(self, name: str, *overrides: str) -> Config:
        common = [f"run.out_dir={self.runs}", f"run.seed={self.seed}", "train.progress=false",
                  "train.tensorboard=false", "data.num_workers=0"]
        return load_config(CONFIGS / f"{name}.yaml", [*common, *overrides])

    def stage(self, name: str, fn) -> dict:
        """Run `fn` unless its result exists; record the wall time."""
        path = self.stage_dir / f"{name}.json"
        if path.exists():
            print(f"[demo] {name}: done earlier, skipped")
            return json.loads(path.read_text())
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(result, indent=1))
        print(f"[demo] {name}: {result['seconds']} s", flush=True)
        return result

    # ---- stages -------------------------------------------------------------------------------

    def vae(self) -> dict:
        from usp.train.engine import train
        from usp.train.tasks import build_task

        config = self.recipe("vae", f"train.max_steps={self.budget('vae_steps')}", f"vae.out={self.vae_dir}",
                             *self.limit())
        train(config, build_task(config), resume="auto")
        stats = json.loads((self.vae_dir / "latent_stats.json").read_text())
        return {"psnr_test": stats["psnr_test"], "scale": stats["scale"], "steps": config.train.max_steps}

    @property
    def vae_dir(self) -> Path:
        return self.out / "vae"

    def limit(self) -> list[str]:
        images = self.budget("images")
        return [f"data.limit={images}"] if images else []

    def latent_overrides(self) -> list[str]:
        return [f"latent.path={self.vae_dir}", f"latent.cache={self.latents}", *self.limit()]

    def cache(self) -> dict:
        from usp.data.images import build_image_dataset, build_transform
        from usp.latent.cache import build_cache
        from usp.latent.vae import LatentSpace

        latent = LatentSpace.load("small-f4", str(self.vae_dir))
        transform = build_transform(32, "center", hflip=False)
        counts = {}
        for split in ("train", "test"):
            limit = self.budget("images" if split == "train" else "test_images")
            dataset = build_image_dataset("fashion_mnist", None, split, transform, limit=limit)
            build_cache(dataset, latent, 32, self.latents, split, batch_size=500, progress=False)
            counts[split] = len(dataset)
        return counts

    def domain(self) -> dict:
        from usp.evaluate.domain import train_domain_classifier

        _, accuracy = train_domain_classifier(self.out / "domain.safetensors", epochs=self.budget("domain_epochs"),
                                              seed=self.seed, limit=5000 if self.quick else None)
        return {"test_accuracy": accuracy}

    @property
    def domain_reference(self) -> Path:
        """The real side of the domain FD: every Fashion-MNIST test image, as an ADM-format NPZ (written once)."""
        path = self.out / "domain_reference.npz"
        if not path.exists():
            from usp.data.fashion_mnist import load_fashion_mnist
            from usp.evaluate.reference import write_sample_npz

            images = load_fashion_mnist(None, "test")[0]  # (N, 28, 28) uint8, padded to 32 px as the data path does
            padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2)))
            write_sample_npz(path, np.repeat(padded[..., None], 3, axis=-1))
        return path

    def pretrain(self) -> dict:
        from usp.evaluate.reconstruct import reconstruct_grid
        from usp.train.checkpoint import latest_weights
        from usp.train.engine import read_log, train
        from usp.train.tasks import build_task

        config = self.recipe("pretrain", *self.latent_overrides(), f"train.max_steps={self.budget('pretrain_steps')}")
        train(config, build_task(config), resume="auto")
        weights = latest_weights(config.run_dir / "checkpoints")
        reconstruct_grid(weights, self.out / "restoration.png", num_images=10,
                         overrides=[f"latent.path={self.vae_dir}"])
        history, _ = read_log(config.run_dir)
        return {"weights": str(weights), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
                "steps": config.train.max_steps}

    def generate(self, name: str, usp_weights: str) -> dict:
        from usp.train.engine import read_log, train
        from usp.train.tasks import build_task

        overrides = [*self.latent_overrides(), f"train.max_steps={self.budget('finetune_steps')}",
                     f"train.eval_every={self.budget('eval_every')}",
                     f"generation.eval_samples={self.budget('eval_samples')}",
                     f"generation.domain_classifier={self.out / 'domain.safetensors'}",
                     f"generation.domain_reference={self.domain_reference}"]
        if name.endswith("usp"):
            overrides.append(f"model.init={usp_weights}")
        config = self.recipe(name, *overrides)
        train(config, build_task(config), resume="auto")
        _, evals = read_log(config.run_dir)
        return {"run_dir": str(config.run_dir), "evals": evals, "final": evals[-1] if evals else {}}

    def probe(self, usp_weights: str) -> dict:
        """The paper's linear probe (LARS, BN + linear on the frozen cls token) and the fast read-out (logistic
        regression, k-NN) of the USP encoder and of the same encoder at random init; logistic on raw pixels."""
        from usp.data.fashion_mnist import load_fashion_mnist
        from usp.evaluate.probes import logistic_regression
        from usp.train.engine import train
        from usp.train.tasks import build_task
        from usp.train.tasks.classification import fast_probe, fast_protocol

        limit = self.budget("probe_train")
        # 5 epochs of the probe recipe (LARS travel ~12, see usp.train.optim.LARS) at batch 256: the cost is the
        # 50 k encoder passes whatever the batch, and 195 smaller steps converge further than 45 (on these frozen
        # features, 68.9 % vs 66.2 %; 10 epochs reach 72.6 %, logistic regression 72.9 %). Quick: runs, no more.
        epochs, batch = (1, 128) if self.quick else (5, 256)
        results = {}
        for name, init in (("usp", usp_weights), ("random_init", None)):
            config = self.recipe("probe", *self.latent_overrides(), f"data.limit={limit}",
                                 f"model.init={init if init else 'null'}", f"run.name=probe-{name}",
                                 f"train.epochs={epochs}", f"train.global_batch={batch}")
            start = time.perf_counter()
            train(config, build_task(config), resume="auto")
            paper = json.loads((config.run_dir / "result.json").read_text())
            paper["seconds"] = time.perf_counter() - start
            results[name] = {"paper": paper, "fast": fast_probe(config)}
        train_x, train_y = load_fashion_mnist(None, "train")
        test_x, test_y = load_fashion_mnist(None, "test")
        start = time.perf_counter()
        raw = logistic_regression(_pixels(train_x[:limit]), torch.tensor(train_y[:limit]), _pixels(test_x),
                                  torch.tensor(test_y))
        features = {"layer": "none", "pooling": "none", "norm": "raw 28×28 pixels, standardised"}
        results["raw_pixels"] = {"fast": {"logistic_top1": raw["top1"], "seconds": time.perf_counter() - start,
                                          "protocol": fast_protocol(features, limit, None)}}
        return results

    def run(self) -> Path:
        from usp.data.fashion_mnist import find_folder

        if find_folder() is None:
            raise FileNotFoundError("Fashion-MNIST not found: `apt-get install dataset-fashion-mnist` (or run "
                                    "`bash scripts/setup.sh`), or set USP_FASHION_MNIST to a folder with its IDX files")
        results = {"vae": self.stage("vae", self.vae)}
        results["cache"] = self.stage("cache", self.cache)
        results["domain"] = self.stage("domain", self.domain)
        results["pretrain"] = self.stage("pretrain", self.pretrain)
        weights = results["pretrain"]["weights"]
        for name in GENERATORS:
            results[name] = self.stage(name, lambda name=name: self.generate(name, weights))
        results["probe"] = self.stage("probe", lambda: self.probe(weights))
        from usp.demo.report import write_report

        return write_report(self.out, results, quick=self.quick, seed=self.seed)


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, H·W) float32, copied (the IDX arrays are read-only memory maps)."""
    return torch.tensor(images.reshape(len(images), -1), dtype=torch.float32)


def run_demo(out: str | Path = "demo_out", quick: bool = False, seed: int = 0) -> Path:
    return Demo(Path(out), quick, seed).run()

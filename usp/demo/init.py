"""`usp init --data DIR`: scan an ImageFolder tree and write a complete, commented recipe set for it.

Written under OUT (default `usp_<data folder name>`):
  recipes/vae.yaml            the small f4 VAE (`usp train-vae`), only below 128 px; SD-VAE is used from 128 px up
  recipes/pretrain.yaml       USP masked latent modeling                       usp pretrain OUT/recipes/pretrain.yaml
  recipes/probe.yaml          linear probe of the USP encoder (Table 12's protocol, scaled)
  recipes/classify.yaml       full fine-tuning (Table 13's protocol, scaled)
  recipes/{dit,sit}_{usp,scratch}.yaml   generators from USP and from scratch, same budget and seed
  exclude.txt                 the bad files the scan found (data.exclude of every recipe)
Every recipe sets `run.root: ..`, so its paths (runs/, latents/, vae/) live under OUT from any working directory,
and the downstream recipes name the pretraining *run folder* as model.init (its latest weights are used).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from usp.data.scan import ScanReport, scan_image_folder

SD_VAE_MIN_SIZE = 128  # below this an SD-VAE latent is under 16×16: too coarse; a small f4 VAE is trained instead


@dataclass(frozen=True)
class Plan:
    """The choices the recipes are written from (everything else follows the shipped fmnist / paper recipes)."""

    image_size: int
    latent_space: str
    size: str  # model size key (usp.models.SIZES)
    num_classes: int
    train_images: int
    batch: int
    flip: bool

    @property
    def small_vae(self) -> bool:
        return self.latent_space == "small-f4"

    def steps(self, epochs: float, low: int, high: int) -> int:
        """Optimiser steps for `epochs` passes over the training images, clamped to [low, high]."""
        return int(min(high, max(low, math.ceil(epochs * self.train_images / self.batch))))


def plan_for(scan: ScanReport, image_size: int | None = None, flip: bool = True) -> Plan:
    """Latent space by resolution (small f4 VAE below 128 px, SD-VAE from 128 px), model size, batch."""
    if image_size is None:
        # The most common short side, to a multiple of 8 (small f4 VAE × patch 2) or 16 (SD-VAE f8 × patch 2).
        sizes = [size for s in scan.splits.values() for size in s.sizes.elements()]
        side = min(max(set(sizes), key=sizes.count)) if sizes else 32
        step = 16 if side >= SD_VAE_MIN_SIZE else 8
        image_size = max(step, round(side / step) * step)
    small = image_size < SD_VAE_MIN_SIZE
    multiple = 8 if small else 16
    if image_size % multiple:
        raise ValueError(f"--image-size {image_size} must be a multiple of {multiple} ("
                         f"{'small f4 VAE' if small else 'SD-VAE f8'} × latent patch 2); "
                         f"use {max(multiple, image_size // multiple * multiple)}")
    train = scan.splits[scan.train_split].images
    batch = 16
    while batch * 2 <= min(256, max(16, train // 4)):  # a power of two, at least 4 steps per epoch when data is small
        batch *= 2
    return Plan(image_size, "small-f4" if small else "sd-vae-ft-ema", "t" if small else "b",
                len(scan.classes), train, batch, flip)


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if (not value or any(c in value for c in ":#{}[],'\" ") or value[0].isdigit()) else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _section(name: str, values: dict) -> str:
    return f"{name}: {{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in values.items()) + "}"


def _recipe(header: list[str], sections: dict[str, dict]) -> str:
    return "\n".join([*(f"# {line}" for line in header), *(_section(k, v) for k, v in sections.items())]) + "\n"


def build_recipes(scan: ScanReport, plan: Plan, exclude: Path | None) -> dict[str, str]:
    """Recipe file name -> YAML text. Paths are relative to OUT (run.root: ..), data paths absolute."""
    p = plan
    data = {"source": "folder", "root": str(scan.root.resolve()), "split": scan.train_split,
            "eval_split": scan.eval_split, "image_size": p.image_size, "hflip": p.flip,
            "exclude": str(exclude.resolve()) if exclude else None, "num_workers": min(4, os.cpu_count() or 1)}
    latent = {"space": p.latent_space, "path": "./vae" if p.small_vae else "stabilityai/sd-vae-ft-ema",
              "cache": "latents"}
    run = lambda task, name: {"task": task, "name": name, "out_dir": "runs", "root": "..", "seed": 0}  # noqa: E731
    where = (f"Data: {scan.root.resolve()} ({p.train_images} usable training images, {p.num_classes} classes; "
             f"split {scan.train_split}, evaluation split {scan.eval_split}), {p.image_size} px, latent space "
             f"{p.latent_space}.")
    flip = "Horizontal flips on" if p.flip else "Horizontal flips OFF (--no-flip: digits/text must not be mirrored)"
    budget = f"Budgets scale with the data: global batch {p.batch}; steps = epochs × images / batch, clamped."
    recipes = {}
    if p.small_vae:
        steps = p.steps(20, 200, 20000)
        recipes["vae.yaml"] = _recipe(
            ["The small KL autoencoder (f4, 8 channels) for images under 128 px: `usp train-vae` writes it to OUT/vae.",
             where, "Its linear code starts as the whitened PCA of training patches (vae.init_images).",
             "Run: usp train-vae THIS_FILE"],
            {"run": run("vae", "vae"), "data": {**data, "hflip": False},
             "vae": {"kl_weight": 1.0e-6, "latent_channels": 8, "width": 64, "depth": 1,
                     "init_images": min(4096, p.train_images), "out": "vae"},
             "optim": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.0, "betas": [0.9, 0.99],
                       "schedule": "cosine", "warmup_epochs": 0.02},
             "train": {"max_steps": steps, "global_batch": min(128, p.batch), "ckpt_every": max(50, steps // 2),
                       "log_every": 50, "keep_last": 1}})
    model = f"vit_{p.size}_2"
    steps = p.steps(200, 200, 100000)
    recipes["pretrain.yaml"] = _recipe(
        ["USP pretraining: masked latent modeling (mask 0.75, norm-pix targets, AdamW (0.9, 0.95), wd 0.05, warm-up",
         "then cosine; blr as the shipped fmnist recipe, since small models on short schedules take a larger lr).",
         where, budget, flip + " (the latent cache stores each image and its flip).",
         f"First: usp cache-latents THIS_FILE --splits {scan.train_split} {scan.eval_split}"
         + ("  (after usp train-vae recipes/vae.yaml)" if p.small_vae else ""),
         "Run: usp pretrain THIS_FILE"],
        {"run": run("pretrain", "pretrain"), "latent": latent, "data": data, "model": {"name": model},
         "pretrain": {"mask_ratio": 0.75, "norm_pix_loss": True},
         "optim": {"name": "adamw", "blr": 1.5e-3 if p.small_vae else 1.5e-4, "weight_decay": 0.05,
                   "betas": [0.9, 0.95], "warmup_epochs": 1.0},
         "train": {"max_steps": steps, "global_batch": p.batch, "ckpt_every": max(50, steps // 4), "log_every": 50,
                   "keep_last": 1}})
    steps = p.steps(90, 100, 50000)
    recipes["probe.yaml"] = _recipe(
        ["Linear probe of the USP encoder (Table 12's protocol scaled: frozen encoder, cls token, BN + linear, LARS).",
         where, "model.init is the pretraining run folder: its latest exported weights are used.",
         "Run: usp probe THIS_FILE   (or --fast: logistic regression on frozen features, not the paper's protocol)"],
        {"run": run("probe", "probe"), "latent": latent, "data": data,
         "model": {"name": model, "init": "runs/pretrain", "global_pool": False, "num_classes": p.num_classes},
         "optim": {"name": "lars", "blr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "schedule": "cosine",
                   "warmup_epochs": 1},
         "train": {"max_steps": steps, "global_batch": p.batch, "ckpt_every": max(50, steps // 2), "log_every": 20}})
    recipes["classify.yaml"] = _recipe(
        ["Full fine-tuning of the USP encoder (Table 13's protocol scaled: AdamW, layer decay 0.75, label smoothing",
         "0.1, drop path 0.1; no mixup/RandAugment, which need images encoded on the fly instead of the cache).",
         where, "Run: usp classify THIS_FILE"],
        {"run": run("classify", "classify"), "latent": latent, "data": data,
         "model": {"name": model, "init": "runs/pretrain", "global_pool": True, "drop_path": 0.1,
                   "num_classes": p.num_classes},
         "classify": {"label_smoothing": 0.1},
         "optim": {"name": "adamw", "blr": 1.0e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "layer_decay": 0.75,
                   "schedule": "cosine", "warmup_epochs": 5},
         "train": {"max_steps": steps, "global_batch": p.batch, "ckpt_every": max(50, steps // 2), "log_every": 20,
                   "eval_every": max(50, steps // 2)}})
    steps = p.steps(200, 200, 400000)
    for family in ("dit", "sit"):
        for origin in ("usp", "scratch"):
            if family == "dit":
                generation = {"method": "ddpm", "learn_sigma": True, "sampler": "ddim", "sample_steps": "ddim10",
                              "cfg_scale": 2.0, "guided_channels": None}
            else:
                generation = {"method": "transport", "learn_sigma": True, "path": "linear", "prediction": "velocity",
                              "sampler": "ode", "ode_method": "heun", "sample_steps": "5", "cfg_scale": 2.0,
                              "guided_channels": None}
            generation.update({"eval_samples": 0, "grid_classes": min(10, p.num_classes), "grid_per_class": 4})
            whence = ("initialised from the USP encoder (model.init: the pretraining run folder, its latest weights)"
                      if origin == "usp" else "from scratch (the baseline)")
            recipes[f"{family}_{origin}.yaml"] = _recipe(
                [f"{family.upper()} fine-tuning, {whence}.",
                 "The paper's recipe (AdamW, constant lr, wd 0, EMA, cached latents) at this scale; USP and scratch",
                 "differ only in model.init; both use the affine-norm (VAE-simple) block.", where, budget, flip + ".",
                 f"Run: usp finetune THIS_FILE   (then: usp sample runs/{family}-{origin} --num-samples 1000)"],
                {"run": run("finetune", f"{family}-{origin}"), "latent": latent, "data": data,
                 "model": {"name": f"{family}_{p.size}_2", "init": "runs/pretrain" if origin == "usp" else None,
                           "num_classes": p.num_classes, "class_dropout": 0.1, "affine_norms": True},
                 "generation": generation,
                 "optim": {"name": "adamw", "lr": 2.0e-3 if p.small_vae else 1.0e-4, "weight_decay": 0.0,
                           "betas": [0.9, 0.999], "schedule": "constant", "warmup_epochs": 0},
                 "train": {"max_steps": steps, "global_batch": p.batch, "ema_decay": 0.99 if p.small_vae else 0.9999,
                           "ckpt_every": max(50, steps // 4), "keep_last": 1, "log_every": 50,
                           "eval_every": max(50, steps // 4)}})
    return recipes


def init_recipes(data: str | os.PathLike, out: str | os.PathLike | None = None, image_size: int | None = None,
                 flip: bool = True, scan: ScanReport | None = None) -> tuple[ScanReport, Plan, list[Path]]:
    """Scan `data`, print the summary, write OUT/recipes/*.yaml and OUT/exclude.txt -> (scan, plan, files)."""
    scan = scan or scan_image_folder(data)
    plan = plan_for(scan, image_size, flip)
    out = Path(out) if out is not None else Path(f"usp_{scan.root.resolve().name}")
    exclude = scan.write_exclude(out / "exclude.txt") if scan.bad_files else None
    files = []
    for name, text in build_recipes(scan, plan, exclude).items():
        path = out / "recipes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files.append(path)
    return scan, plan, files

"""`usp init --data DIR`: scan an ImageFolder tree and write a recipe set for it, each recipe a shipped one named
as `base:` plus only what this data decides (where the images are, their size and classes, the budget).

Written under OUT (default `usp_<data folder name>`):
  recipes/vae.yaml            the small f4 VAE (`usp train-vae`), only below 128 px; SD-VAE is used from 128 px up
  recipes/pretrain.yaml       USP masked latent modeling                       usp pretrain OUT/recipes/pretrain.yaml
  recipes/probe.yaml          linear probe of the USP encoder (Table 12's protocol, scaled)
  recipes/classify.yaml       full fine-tuning (Table 13's protocol, scaled)
  recipes/{dit,sit}_{usp,scratch}.yaml   generators from USP and from scratch, same budget and seed
  exclude.txt                 the bad files the scan found (data.exclude of every recipe)
Below 128 px the bases are the Fashion-MNIST demo's recipes (small f4 VAE, size t), from 128 px the paper's at
size B (SD-VAE f8). Every recipe sets `run.root: ..`, so its paths (runs/, latents/, vae/) live under OUT from any
working directory, and the downstream recipes name the pretraining *run folder* as model.init (its latest weights).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from usp.config import PROBE_MIN_STEPS, config_from_dict, read_recipe
from usp.data.scan import ScanReport, scan_image_folder

SD_VAE_MIN_SIZE = 128  # below this an SD-VAE latent is under 16×16: too coarse; a small f4 VAE is trained instead

# recipe -> (its base below 128 px, from 128 px); None: not written at that size.
BASES = {
    "vae": ("fmnist/vae", None),
    "pretrain": ("fmnist/pretrain", "pretrain/vit_b_2_sdvae_256"),
    "probe": ("fmnist/probe", "probe/vit_b_2_sdvae_224"),
    "classify": ("fmnist/classify", "classify/vit_b_2_sdvae_224"),
    "dit_usp": ("fmnist/dit_usp", "finetune/dit_b_2_usp_256"),
    "dit_scratch": ("fmnist/dit_scratch", "finetune/dit_b_2_scratch_256"),
    "sit_usp": ("fmnist/sit_usp", "finetune/sit_b_2_usp_256"),
    "sit_scratch": ("fmnist/sit_scratch", "finetune/sit_b_2_scratch_256"),
}
# The evaluation sampler at this scale (the demo's): few steps, so a checkpoint is scored in seconds, not hours.
SAMPLERS = {"dit": {"sampler": "ddim", "sample_steps": "ddim10"},
            "sit": {"sampler": "ode", "ode_method": "heun", "sample_steps": "5"}}


@dataclass(frozen=True)
class RecipeChoices:
    """What the data decides (everything else comes from the base recipes)."""

    image_size: int
    latent_space: str
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


def choose(scan: ScanReport, image_size: int | None = None, flip: bool = True) -> RecipeChoices:
    """Latent space by resolution (small f4 VAE below 128 px, SD-VAE from 128 px) and the batch."""
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
    return RecipeChoices(image_size, "small-f4" if small else "sd-vae-ft-ema", len(scan.classes), train, batch, flip)


def decided(name: str, scan: ScanReport, c: RecipeChoices, exclude: Path | None) -> dict[str, dict]:
    """The values `usp init` sets in recipe `name`: the data, the budget (steps = epochs × images / batch,
    clamped), and what caching the latents implies. Written only where they differ from the base."""
    data = {"source": "folder", "root": str(scan.root.resolve()), "split": scan.train_split,
            "eval_split": scan.eval_split, "image_size": c.image_size, "hflip": c.flip and name != "vae",
            "exclude": str(exclude.resolve()) if exclude else None, "num_workers": min(4, os.cpu_count() or 1)}
    values = {"run": {"name": name.replace("_", "-"), "out_dir": "runs", "root": "..", "seed": 0}, "data": data}
    if name != "vae":
        values["latent"] = {"space": c.latent_space, "cache": "latents",
                            "path": "./vae" if c.small_vae else "stabilityai/sd-vae-ft-ema"}
    downstream = {"init": "runs/pretrain", "num_classes": c.num_classes}  # the pretraining run folder
    if name == "vae":
        steps = c.steps(20, 200, 20000)
        values["vae"] = {"init_images": min(4096, c.train_images), "out": "vae"}
        values["train"] = {"max_steps": steps, "global_batch": min(128, c.batch), "ckpt_every": max(50, steps // 2),
                           "log_every": 50, "keep_last": 1}
    elif name == "pretrain":
        steps = c.steps(200, 200, 100000)
        values["optim"] = {"schedule": "cosine", "warmup_epochs": 1.0}
        values["train"] = {"max_steps": steps, "global_batch": c.batch, "ckpt_every": max(50, steps // 4),
                           "log_every": 50, "keep_last": 1}
    elif name in ("probe", "classify"):
        # The paper's epochs (probe 90, fine-tune 100) at a batch that gives >= 4 steps per epoch; the probe's
        # schedule stays in epochs so the engine's floor (PROBE_MIN_STEPS) stretches it on small data at the same
        # summed lr (measured: docs/probe_small_data.md), the fine-tune's is at least that many steps.
        steps = c.steps(90 if name == "probe" else 100, PROBE_MIN_STEPS, 50000)
        values["model"] = downstream
        values["train"] = {"max_steps": steps, "global_batch": c.batch, "ckpt_every": max(50, steps // 2),
                           "log_every": 20}
        if name == "probe":
            values["train"].update({"max_steps": None, "epochs": 90})
            values["optim"] = {"warmup_epochs": 1.0}
        else:  # on cached latents: no mixup / RandAugment / erasing, which need images encoded on the fly
            values["classify"] = {"mixup": 0.0, "cutmix": 0.0, "randaug": None, "random_erasing": 0.0,
                                  "label_smoothing": 0.1}
            values["optim"] = {"min_lr": 0.0, "warmup_epochs": 5.0}
            values["train"]["eval_every"] = max(50, steps // 2)
    else:
        family, origin = name.split("_")
        steps = c.steps(200, 200, 400000)
        values["model"] = {**downstream, "init": downstream["init"] if origin == "usp" else None,
                           "affine_norms": True}  # USP and scratch: the same (VAE-simple) block
        values["generation"] = {**SAMPLERS[family], "cfg_scale": 2.0, "guided_channels": None, "eval_samples": 0,
                                "grid_classes": min(10, c.num_classes), "grid_per_class": 4}
        values["train"] = {"max_steps": steps, "global_batch": c.batch, "ckpt_every": max(50, steps // 4),
                           "keep_last": 1, "log_every": 50, "eval_every": max(50, steps // 4)}
    return values


def overrides(values: dict[str, dict], base: str) -> dict[str, dict]:
    """The entries of `values` that differ from the resolved `base` recipe (its defaults included)."""
    resolved = config_from_dict(read_recipe(base)).to_dict()
    out = {}
    for section, entries in values.items():
        changed = {k: v for k, v in entries.items() if resolved.get(section, {}).get(k, object()) != v}
        if changed:
            out[section] = changed
    return out


def recipe_text(name: str, scan: ScanReport, c: RecipeChoices, exclude: Path | None) -> str:
    """The YAML of recipe `name`: a header, `base:`, and its overrides."""
    base = BASES[name][0 if c.small_vae else 1]
    command = {"vae": "train-vae", "pretrain": "pretrain", "probe": "probe", "classify": "classify"}.get(name,
                                                                                                    "finetune")
    header = [f"{name} for {scan.root.resolve()}",
              f"`usp init`: the shipped recipe {base} (`usp list recipes`) with what this data decides.",
              f"Data: {c.train_images} usable training images, {c.num_classes} classes (split {scan.train_split}, "
              f"evaluation split {scan.eval_split}),",
              f"{c.image_size} px, latent space {c.latent_space}, horizontal flips "
              + ("on." if c.flip else "OFF (--no-flip)."),
              f"Budget: global batch {c.batch}; steps = epochs × images / batch, clamped.",
              f"Run: usp {command} THIS_FILE"]
    if name == "pretrain":
        header.insert(-1, f"First: usp cache-latents THIS_FILE --splits {scan.train_split} {scan.eval_split}"
                      + ("  (after usp train-vae recipes/vae.yaml)" if c.small_vae else ""))
    body = yaml.safe_dump({"base": base, **overrides(decided(name, scan, c, exclude), base)}, sort_keys=False,
                          default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def init_recipes(data: str | os.PathLike, out: str | os.PathLike | None = None, image_size: int | None = None,
                 flip: bool = True, scan: ScanReport | None = None) -> tuple[ScanReport, RecipeChoices, list[Path]]:
    """Scan `data`, write OUT/recipes/*.yaml and OUT/exclude.txt -> (scan, choices, files written)."""
    scan = scan or scan_image_folder(data)
    choices = choose(scan, image_size, flip)
    out = Path(out) if out is not None else Path(f"usp_{scan.root.resolve().name}")
    exclude = scan.write_exclude(out / "exclude.txt") if scan.bad_files else None
    files = []
    for name, bases in BASES.items():
        if bases[0 if choices.small_vae else 1] is None:
            continue
        path = out / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe_text(name, scan, choices, exclude))
        files.append(path)
    return scan, choices, files


def summary(scan: ScanReport, choices: RecipeChoices, files: list[Path]) -> str:
    """What `usp init` prints: the scan, the choices, the recipes written and the commands that run them."""
    c, first = choices, files[0].parent
    steps = ([f"usp train-vae {first / 'vae.yaml'}"] if c.small_vae else []) + [
        f"usp cache-latents {first / 'pretrain.yaml'} --splits {scan.train_split} {scan.eval_split}",
        f"usp pretrain {first / 'pretrain.yaml'}", f"usp finetune {first / 'dit_usp.yaml'}",
        f"usp probe {first / 'probe.yaml'} --fast"]
    return "\n".join([scan.table(), "", f"{c.image_size} px, latent space {c.latent_space}, {c.num_classes} classes; "
                      "recipes:", *(f"  {path}" for path in files), "next:", *(f"  {line}" for line in steps)])


def init_command(data: str, out: str | None = None, image_size: int | None = None, flip: bool = True) -> None:
    """`usp init --data DIR`: `init_recipes`, then its `summary`."""
    print(summary(*init_recipes(data, out, image_size=image_size, flip=flip)))

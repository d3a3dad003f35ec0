"""Rehearse the shipped ImageNet recipes on one machine before a cluster run: every stage a few steps at a small
batch, at the recipes' real model sizes, on stand-in data and random weights in the real file layouts.

  python scripts/rehearse.py --out rehearsal                      # every recipe of configs/{pretrain,finetune,
                                                                  #   probe,classify}, then sample + evaluate
  python scripts/rehearse.py --out r --only probe/vit_b_2_sdvae_224 classify/vit_b_2_sdvae_224 --batch 4
  python scripts/rehearse.py --out r --reduced                    # tiny models at 64 px (the slow test)

It writes OUT/data (an ImageNet-layout tree: 1 000 class folders of JPEGs, train and val), OUT/assets (SD-VAE
as a diffusers folder, KL-16 and VA-VAE as LDM checkpoints with VA-VAE's latents_stats.pt, a DINOv2 ViT-B/14
teacher, the FID Inception state dict — all random weights), runs each stage as a user would (`python -m usp
...`, one process per stage) and prints a table: exit status, seconds, the process's peak memory (RSS), and the
predicted peak per GPU at the recipe's own batch (train.global_batch / GPUS / accum_steps, bf16 autocast; the
estimate of usp.train.memory). A row's log is OUT/logs/<row>.log.

What it changes in each recipe (overrides, listed in the log): data.root, data.limit (= --batch images per
split), latent.path, latent.cache (a cache of the stand-in tree, for recipes that read one), model.init (the
rehearsal's own pretraining run of that encoder, in this call or an earlier one with the same --out; its resume
states are deleted, its weights kept), REPA's teacher weights (and repa.features=online on a cache),
train.max_steps/global_batch/accum_steps, and sampling at the end of a fine-tune (2 steps, a 2-image grid).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPUS = 8  # the per-GPU batch of the prediction: train.global_batch / GPUS (DiT, SiT, MAE trained on 8-GPU nodes)
GPU_BYTES = 80 * 2**30
ESTIMATE = re.compile(r"estimated peak memory per device ([\d.]+) GiB")  # the line every training run logs first
SD_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 256,
          "scaling_factor": 0.18215}  # stabilityai/sd-vae-ft-ema's config.json
REDUCED_SD_VAE = {**SD_VAE, "block_out_channels": [32, 32, 64, 64]}
TINY_TEACHER = {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "reg_tokens": 4}


# --------------------------------------------------------------------------------------------
# Stand-in data and weights
# --------------------------------------------------------------------------------------------


def make_tree(root: Path, classes: int, per_class: int, size: tuple[int, int] = (300, 260)) -> Path:
    """root/{train,val}/nXXXXXXXX/*.JPEG of random colour fields (ImageNet's layout and naming)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"n{c:08d}_{i}.JPEG"
                if not path.exists():
                    base = rng.integers(0, 256, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
                    Image.fromarray(base).resize(size, Image.BILINEAR).save(path, quality=90)
    return root


def asset_paths(folder: Path) -> dict[str, Path]:
    return {"sd-vae": folder / "sd-vae-ft-ema", "kl16": folder / "kl16.ckpt",
            "va-vae": folder / "vavae" / "vavae-imagenet256-f16d32-dinov2.pt",
            "teacher": folder / "dinov2_vitb14.safetensors", "inception": folder / "pt_inception-2015-12-05.pth"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def make_assets(folder: Path, reduced: bool) -> dict[str, Path]:
    """Random weights in the layouts the recipes name: name -> path. Run in a child process (`--assets`): this
    process stays small, since a child's peak RSS counts its parent's at the fork (Linux `ru_maxrss`)."""
    import torch
    from diffusers import AutoencoderKL

    from usp.evaluate.inception import save_random_weights
    from usp.latent.ldm import KL16_LAYOUT, VAVAE_F16D32_LAYOUT, random_ldm_state
    from usp.models.repa import build_teacher_encoder, save_teacher

    folder.mkdir(parents=True, exist_ok=True)
    paths = asset_paths(folder)
    torch.manual_seed(0)
    if not (paths["sd-vae"] / "config.json").exists():
        AutoencoderKL(**(REDUCED_SD_VAE if reduced else SD_VAE)).save_pretrained(str(paths["sd-vae"]))
    if not paths["kl16"].exists():
        torch.save({"model": random_ldm_state(KL16_LAYOUT)}, paths["kl16"])
    if not paths["va-vae"].exists():
        paths["va-vae"].parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": random_ldm_state(VAVAE_F16D32_LAYOUT, seed=1)}, paths["va-vae"])
        torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)},
                   paths["va-vae"].parent / "latents_stats.pt")
    if not paths["teacher"].exists():
        if reduced:
            save_teacher(build_teacher_encoder("vit_small_patch14_reg4_dinov2", **TINY_TEACHER), paths["teacher"],
                         TINY_TEACHER)
        else:
            save_teacher(build_teacher_encoder("vit_base_patch14_dinov2", img_size=224), paths["teacher"],
                         {"img_size": 224})
    if not paths["inception"].exists():
        save_random_weights(paths["inception"])
    return paths


# --------------------------------------------------------------------------------------------
# The recipes and what each needs
# --------------------------------------------------------------------------------------------


def shipped_recipes() -> list[str]:
    return [f"{group}/{path.stem}" for group in ("pretrain", "finetune", "probe", "classify")
            for path in sorted((ROOT / "configs" / group).glob("*.yaml"))]


COMMAND = {"pretrain": "pretrain", "finetune": "finetune", "probe": "probe", "classify": "classify"}


def reduce_model(name: str) -> str:
    """vit_xl_2 -> vit_t_2: the same family and patch, the smallest size."""
    family, _, patch = name.split("_")[:3]
    return "_".join([family, "t", patch, *name.split("_")[3:]])


def latent_path(space: str, assets: dict[str, Path]) -> str:
    return str({"sd-vae-ft-ema": assets["sd-vae"], "sd-vae-ft-mse": assets["sd-vae"], "kl16": assets["kl16"],
                "va-vae-f16d32": assets["va-vae"]}[space])


class Rehearsal:
    def __init__(self, out: Path, batch: int, steps: int, reduced: bool, classes: int):
        self.out, self.batch, self.steps, self.reduced = out, batch, steps, reduced
        self.tree = make_tree(out / "data", classes, 1)
        subprocess.run([sys.executable, __file__, "--out", str(out), "--assets", *(["--reduced"] if reduced else [])],
                       check=True, env=_env())
        self.assets = asset_paths(out / "assets")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.pretrain_runs: dict[tuple[str, str], Path] = {}  # (model, latent space) -> run folder
        self.first_finetune: str | None = None  # the fine-tune that `usp sample` reads (set by main)
        self.sampled: str | None = None  # the fine-tune the sample / reference / evaluate rows belong to

    def config(self, recipe: str, overrides: list[str]):
        from usp.config import load_config

        return load_config(recipe, overrides)

    def overrides(self, recipe: str) -> list[str]:
        """What the rehearsal changes in `recipe` (see the module docstring)."""
        config = self.config(recipe, [])
        group = recipe.split("/")[0]
        rc, lc = config.repa, config.latent
        model = reduce_model(config.model.name) if self.reduced else config.model.name
        out = [f"data.root={self.tree}", f"data.limit={self.batch}", "data.num_workers=0",
               f"latent.path={latent_path(lc.space, self.assets)}", f"run.out_dir={self.out / 'runs'}",
               f"run.name={recipe.replace('/', '-')}", f"train.max_steps={self.steps}",
               f"train.global_batch={self.batch}", "train.accum_steps=1", f"train.ckpt_every={self.steps}",
               "train.log_every=1", "train.eval_every=0", "train.tensorboard=false", "train.progress=false",
               "run.device=cpu", f"model.name={model}"]
        if self.reduced:
            out.append("data.image_size=64")
        if group == "finetune":
            ddpm = config.generation.method == "ddpm"
            sampler = (["generation.sampler=ddim", "generation.sample_steps=ddim2"] if ddpm
                       else ["generation.sampler=ode", "generation.ode_method=euler", "generation.sample_steps=2"])
            out += [*sampler, "generation.preset=none", "generation.grid_classes=2", "generation.grid_per_class=1",
                    "generation.eval_samples=0", "generation.domain_classifier=null"]
            if lc.cache:
                out.append(f"latent.cache={self.cache_dir(config)}")
            if rc.enabled:
                teacher = "vit_small_patch14_reg4_dinov2" if self.reduced else rc.teacher
                out += [f"repa.teacher={teacher}", f"repa.teacher_weights={self.assets['teacher']}"]
                out += ["repa.features=online"] if lc.cache else []
                if self.reduced:
                    out += ["repa.depth=2", "repa.teacher_size=32"]
        if config.model.init:
            out.append(f"model.init={self.pretrain_run(config)}")
        return out

    def cache_dir(self, config) -> Path:
        return self.out / "latents" / f"{config.latent.space}-{64 if self.reduced else config.data.image_size}"

    def pretrain_run(self, config) -> str:
        """The rehearsal's pretraining run of this encoder (model size and patch, block kind, latent space): a
        LightningDiT transfers from a `vit_*_lightning` encoder (SwiGLU, qk-norm), every other model from a plain
        ViT."""

        def encoder(model: str, space: str) -> tuple[str, bool, str]:
            return ("_".join(model.split("_")[1:3]), "lightning" in model,
                    space.replace("sd-vae-ft-mse", "sd-vae-ft-ema"))  # one SD-VAE encoder, two decoders

        wanted = encoder(config.model.name, config.latent.space)
        for (name, space), run in self.pretrain_runs.items():
            if encoder(name, space) == wanted:
                return str(run)
        for recipe in shipped_recipes():  # a pretraining rehearsed by an earlier call with the same --out
            if recipe.startswith("pretrain/"):
                pretrained = self.config(recipe, [])
                run = self.out / "runs" / recipe.replace("/", "-")
                if (list((run / "checkpoints").glob("weights_*.safetensors")) and (run / "done.json").exists()
                        and encoder(pretrained.model.name, pretrained.latent.space) == wanted):
                    return str(run)
        return "null"  # no pretraining of it rehearsed (or it failed): the stage runs from scratch

    # ----------------------------------------------------------------------------------------

    def run(self, name: str, argv: list[str], predict: list[str] | None = None) -> dict:
        """`python -m usp ARGV` as its own process: exit status, seconds, peak RSS; and the predicted peak."""
        log = self.out / "logs" / f"{name.replace('/', '-')}.log"
        env = _env()
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(argv) + "\n")
            f.flush()
            proc = subprocess.Popen([sys.executable, "-m", "usp", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        row = {"stage": name, "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
               "peak_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "load": round(os.getloadavg()[0], 1),
               "batch": self.batch, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        estimates = ESTIMATE.findall(log.read_text())  # what the run printed at its start, at this batch
        if estimates:
            row["estimate_gib"] = float(estimates[-1])
        if predict is not None:
            row.update(self.predict(*predict))
        if name in ("sample", "reference", "evaluate"):
            row["of"] = self.sampled  # which fine-tune was sampled: one table holds several
        self.rows.append(row)
        self.save(row)
        print(format_row(row), flush=True)
        return row

    def save(self, row: dict) -> None:
        """Add the row to OUT/rehearsal.json as soon as it is measured: the table is built over several calls (and
        survives a stopped one); a stage rehearsed again replaces its earlier row."""
        path = self.out / "rehearsal.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if (r["stage"], r.get("of")) != (row["stage"], row.get("of"))] + [row]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)

    def predict(self, recipe: str, *overrides: str) -> dict:
        """The peak per GPU at the recipe's own per-GPU batch (usp.train.memory, traced in a child process)."""
        config = self.config(recipe, [])
        per_gpu = max(1, config.train.global_batch // GPUS // config.train.accum_steps)
        code = ("import json, sys, torch; from usp.config import load_config; from usp.train.tasks import build_task; "
                "from usp.train.memory import estimate_run; c = load_config(sys.argv[1], sys.argv[3:]); "
                "e = estimate_run(c, build_task(c), int(sys.argv[2]), torch.device('cpu'), torch.bfloat16); "
                "print(json.dumps({'total': e.total, 'parts': e.parts, 'missing': e.missing}))")
        env = _env()
        done = subprocess.run([sys.executable, "-c", code, recipe, str(per_gpu), *overrides,
                               f"run.name=predict-{recipe.replace('/', '-')}"], capture_output=True, text=True,
                              env=env)
        if done.returncode:
            return {"per_gpu_batch": per_gpu, "predicted_gib": None}
        estimate = json.loads(done.stdout.strip().splitlines()[-1])
        return {"per_gpu_batch": per_gpu, "predicted_gib": round(estimate["total"] / 2**30, 1),
                "fits_80gb": estimate["total"] < GPU_BYTES}

    def recipe(self, recipe: str) -> None:
        group = recipe.split("/")[0]
        overrides = self.overrides(recipe)
        config = self.config(recipe, overrides)
        if group == "finetune" and config.latent.cache and not (self.cache_dir(config) / "train.latents").exists():
            cache = self.cache_dir(config)
            # The REPA overrides stay: with the teacher online the cache holds latents only (no teacher tokens,
            # which `usp cache-latents` of a REPA recipe otherwise computes with the recipe's teacher).
            cache_overrides = [o for o in overrides if not o.startswith("latent.cache=")]
            self.run(f"cache/{cache.name}", ["cache-latents", recipe, "--out", str(cache), "--splits", "train",
                                             *cache_overrides])
        # The prediction keeps the recipe's model, batch and resolution; only files and data move to the stand-ins.
        keep = ("model.name=", "train.global_batch=", "train.accum_steps=", "data.image_size=", "repa.depth=",
                "repa.teacher_size=", "repa.teacher=")
        predict = [o for o in overrides if not o.startswith(keep) or self.reduced]
        shutil.rmtree(config.run_dir, ignore_errors=True)  # a rehearsal's own run folder: each rehearsal starts fresh
        row = self.run(recipe, [COMMAND[group], recipe, "--resume", "none", *overrides], [recipe, *predict])
        if group == "pretrain" and row["exit"] == 0:
            self.pretrain_runs.setdefault((config.model.name, config.latent.space), config.run_dir)
        self.prune(config.run_dir, keep_weights=group == "pretrain" or recipe == self.first_finetune)

    @staticmethod
    def prune(run_dir: Path, keep_weights: bool) -> None:
        """Delete what no later stage reads (an XL run's resume state is ~8 GB): the resume states always, the
        weights unless a fine-tune's model.init or `usp sample` reads them."""
        for path in sorted((run_dir / "checkpoints").glob("state_*.pt" if keep_weights else "*_*.*")):
            path.unlink()

    def sample_and_evaluate(self, finetune: str) -> None:
        """`usp sample` of a rehearsed fine-tune, a reference batch of the tree, `usp evaluate` of both."""
        self.sampled = finetune
        config = self.config(finetune, self.overrides(finetune))
        weights = sorted((config.run_dir / "checkpoints").glob("weights_*.safetensors"))
        if not weights:
            return
        samples, count = self.out / "samples", max(4, self.batch)  # the k-NN precision/recall needs k + 1 = 4
        shutil.rmtree(samples, ignore_errors=True)
        self.run("sample", ["sample", str(weights[-1]), "--num-samples", str(count), "--batch-size",
                            str(self.batch), "--out", str(samples), "--grid", str(count),
                            *[o for o in self.overrides(finetune) if o.startswith("generation.")]])
        size = 64 if self.reduced else config.data.image_size
        ref = self.out / "ref.npz"
        self.run("reference", ["reference", str(self.tree / "val"), "--out", str(ref), "--image-size", str(size),
                               "--num", str(count)])
        npz = next(iter(sorted(p for p in samples.glob("*.npz") if not p.name.startswith("chunk_"))),
                   samples / "missing.npz")
        self.run("evaluate", ["evaluate", str(ref), str(npz), "--inception-weights", str(self.assets["inception"]),
                              "--batch-size", str(self.batch), "--device", "cpu",
                              "--out", str(self.out / "metrics.json")])


def format_row(row: dict) -> str:
    predicted = row.get("predicted_gib")
    pred = "" if "per_gpu_batch" not in row else (
        f"{predicted:>8} GiB at {row['per_gpu_batch']:>4}/GPU" if predicted is not None else "   (no estimate)")
    return f"| {row['stage']:<34} | {row['exit']:>4} | {row['seconds']:>8} | {row['peak_gib']:>8} | {pred} |"


def table(out: Path) -> str:
    """The markdown table of OUT/rehearsal.json, shipped recipes in their order, then the cache / sample stages,
    and which shipped recipes have no row with exit 0 yet."""
    rows = json.loads((out / "rehearsal.json").read_text())
    order = {name: i for i, name in enumerate(shipped_recipes())}
    rows = sorted(rows, key=lambda r: (r["stage"] not in order, order.get(r["stage"], 0), r["stage"]))
    lines = ["| stage | batch | exit | seconds | peak RSS GiB | estimate at that batch GiB "
             "| predicted peak per GPU (bf16, 8 GPUs) | load | finished |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pred = "" if r.get("per_gpu_batch") is None else (
            f"{r['predicted_gib']} GiB at {r['per_gpu_batch']}/GPU" if r.get("predicted_gib") is not None
            else "(no estimate)")
        stage = r["stage"] + (f" (of {r['of']})" if r.get("of") else "")
        lines.append(f"| {stage} | {r.get('batch', '')} | {r['exit']} | {r['seconds']} | {r['peak_gib']} "
                     f"| {r.get('estimate_gib', '')} | {pred} | {r.get('load', '')} | {r.get('finished', '')} |")
    passed = {r["stage"] for r in rows if r["exit"] == 0}
    missing = [name for name in order if name not in passed]
    lines.append("")
    lines.append(f"{len(order) - len(missing)} of {len(order)} shipped recipes exit 0"
                 + (f"; not yet: {', '.join(missing)}" if missing else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the tree, the assets, the runs and the logs")
    parser.add_argument("--only", nargs="+", help="these recipes (e.g. probe/vit_b_2_sdvae_224); default: all")
    parser.add_argument("--batch", type=int, default=2, help="global batch of every stage and images per split")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps of every training stage")
    parser.add_argument("--classes", type=int, default=1000, help="class folders of the stand-in tree")
    parser.add_argument("--reduced", action="store_true", help="tiny models at 64 px (checks the path, not memory)")
    parser.add_argument("--no-sample", action="store_true", help="skip sample / reference / evaluate")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/rehearsal.json and exit")
    parser.add_argument("--assets", action="store_true", help=argparse.SUPPRESS)  # the child that writes them
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.out)))
        return 0
    if args.assets:
        make_assets(Path(args.out) / "assets", args.reduced)
        return 0
    rehearsal = Rehearsal(Path(args.out), args.batch, args.steps, args.reduced, args.classes)
    recipes = args.only or shipped_recipes()
    pretrain_first = sorted(recipes, key=lambda r: not r.startswith("pretrain/"))  # their runs feed model.init
    print(f"| {'stage':<34} | exit | seconds  | peak GiB | predicted peak per GPU (bf16, {GPUS} GPUs) |")
    print(f"| {'-' * 34} | ---- | -------- | -------- | --- |")
    finetunes = [r for r in pretrain_first if r.startswith("finetune/")]
    rehearsal.first_finetune = finetunes[0] if finetunes and not args.no_sample else None
    for recipe in pretrain_first:
        rehearsal.recipe(recipe)
    if finetunes and not args.no_sample:
        rehearsal.sample_and_evaluate(finetunes[0])
    return int(any(row["exit"] != 0 for row in rehearsal.rows))


if __name__ == "__main__":
    sys.exit(main())

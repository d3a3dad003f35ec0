"""`usp export WEIGHTS --to {diffusers,timm,hub} OUT`: a run's weights file in the layouts other tools load.

    diffusers  DiT (DDPM) -> DiTPipeline folder; SiT / REPA-trained -> transformer + scheduler folder (diffusers.py)
    timm       USP encoder (pretrain, probe, classify weights) -> timm VisionTransformer folder (timm.py)
    hub        either of the above + the usp weights and recipe + README.md model card (hub.py)

Only `weights_*.safetensors` files a usp run wrote are exported: their metadata carries the recipe that says
which network, latent space and objective the tensors belong to. `OUT` must not exist yet; it is written in a
temporary folder beside it and renamed when complete. May import: config, run (the weights and log readers),
models, diffusion (the sampler's grid, for the model card), data, latent, sample (the generator builder). Reading a
diffusers folder back is `usp.sample.diffusers`; the key mapping both use is `usp.models.diffusers`.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

TARGETS = ("diffusers", "timm", "hub")
# Which target holds which family (the registry's families; a `vae` run has no model name there).
TARGET_FAMILIES = {"diffusers": ("dit", "sit"), "timm": ("vit", "vit_cls"),
                   "hub": ("dit", "sit", "lightningdit", "vit", "vit_cls", "vit_lightning")}


def read_run_weights(path: str | Path):
    """(weights, metadata, Config, family) of a usp weights file; one clear error for anything else."""
    from usp.config import config_from_dict
    from usp.models import model_entry
    from usp.run.weights import load_weights, resolve_weights

    path = resolve_weights(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a usp weights file: export reads the weights_*.safetensors a usp run wrote "
                         "(runs/<name>/checkpoints/); a public .pt checkpoint has no recipe to export with")
    weights, meta = load_weights(path)
    if not meta.get("config") or not meta.get("model"):
        raise ValueError(f"{path} is not a usp weights file (no usp metadata: model name and recipe); export reads "
                         "the weights_*.safetensors a usp run wrote (runs/<name>/checkpoints/)")
    config = config_from_dict(meta["config"])
    if meta.get("task") == "vae":
        return weights, meta, config, "vae"
    return weights, meta, config, model_entry(meta["model"]).family


def class_names(config) -> list[str] | None:
    """The names of the labels the run trained on: Fashion-MNIST's, or the class folders of data.root/split."""
    if config.data.source == "fashion_mnist":
        from usp.data.fashion_mnist import CLASSES

        return list(CLASSES)
    root = Path(config.data.root or "") / config.data.split
    if config.data.root and root.is_dir():
        return sorted(d.name for d in root.iterdir() if d.is_dir()) or None
    return None


def build_run_generator(weights, config):
    """The run's DiT/SiT with its weights loaded (REPA projectors are not in a weights file)."""
    from usp.run.weights import load_strict
    from usp.sample.run import build_generator

    model = build_generator(config)
    load_strict(model, weights, config.model.name)
    return model.eval()


def export(weights_path: str | Path, target: str, out: str | Path, license: str = "other") -> tuple[Path, list[str]]:
    """Write the export of `weights_path` to the new folder `out`; returns (out, notes for the user)."""
    if target not in TARGETS:
        raise ValueError(f"--to {target!r} is not a target; choose one of {', '.join(TARGETS)}")
    weights, meta, config, family = read_run_weights(weights_path)
    if family not in TARGET_FAMILIES[target]:
        held = "a VAE run" if family == "vae" else f"a {family} network ({meta['model']})"
        fits = [t for t, fams in TARGET_FAMILIES.items() if family in fams]
        raise ValueError(f"{weights_path} holds {held}, which --to {target} cannot hold ({target} takes "
                         f"{'/'.join(TARGET_FAMILIES[target])} weights); "
                         + (f"export it --to {' or --to '.join(fits)}" if fits else "it has no export target"))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the export")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        notes = _write(target, weights, meta, config, family, tmp, license, Path(weights_path))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, notes


def _write(target, weights, meta, config, family, out: Path, license: str, source: Path) -> list[str]:
    names = class_names(config)
    if target == "hub":
        from usp.export.hub import write_hub

        return write_hub(weights, meta, config, family, out, names, license, source)
    if target == "diffusers":
        from usp.export.diffusers import write_diffusers

        return write_diffusers(build_run_generator(weights, config), config, family, out, names)
    from usp.export.timm import write_timm

    write_timm(weights, config, family, out, names)
    return []


def export_command(weights: str, to: str, out: str, license: str = "other") -> None:
    """`usp export WEIGHTS --to TARGET OUT`: `export`, with its notes for the user."""
    folder, notes = export(weights, to, out, license=license)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {folder}")

"""`usp fetch RECIPE... --cache DIR`: download every hub asset the recipes need into one folder, on a machine with
network, so that a cluster job without internet runs: the VAE of each recipe's latent space (Hugging Face hub, into
DIR/hf) and the FID Inception weights (DIR/<file>). Prints the environment to set on the offline machine.
Local assets (the small VAE `usp train-vae` writes, KL-16 checkpoints) are checked, not downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from usp.config import load_config
from usp.latent.vae import spec_of


def assets(recipes: list[str]) -> list[tuple[str, str]]:
    """(kind, where) of every external asset the recipes read: ("hub", repo id) or ("local", path)."""
    found: list[tuple[str, str]] = []
    for recipe in recipes:
        config = load_config(recipe)
        spec = spec_of(config.latent.space)
        path = config.latent.path or spec.default_path
        if path is None:
            continue
        is_local = (spec.kind == "ldm" or spec.norm == "usp_stats" or Path(path).exists()
                    or path.startswith(("/", ".", "~")))
        entry = ("local" if is_local else "hub", path)
        if entry not in found:
            found.append(entry)
    return found


def fetch(recipes: list[str], cache: str | os.PathLike, inception: bool = True) -> list[str]:
    """Download the recipes' hub assets (and the Inception weights) into `cache`; returns the lines to print."""
    cache = Path(cache).expanduser().resolve()
    lines = []
    for kind, where in assets(recipes):
        if kind == "local":
            state = "present" if Path(where).exists() else "MISSING (train or copy it; it is not downloadable)"
            lines.append(f"local asset {where}: {state}")
            continue
        from huggingface_hub import snapshot_download

        snapshot_download(where, cache_dir=str(cache / "hf" / "hub"))
        lines.append(f"VAE {where} -> {cache / 'hf'}")
    env = [f"export HF_HOME={cache / 'hf'} HF_HUB_OFFLINE=1"]
    if inception:
        import torch

        from usp.evaluate.inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_URL

        target = cache / WEIGHTS_FILE
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(target), progress=False)
        lines.append(f"Inception weights -> {target}")
        env.append(f"export {WEIGHTS_ENV}={target}")
    return [*lines, "on the offline machine (same folder, copied or shared):", *env]


def fetch_command(recipes: list[str], cache: str, no_inception: bool = False) -> None:
    """`usp fetch RECIPE... --cache DIR`: `fetch`, one line per asset, then the offline machine's environment."""
    print("\n".join(fetch(recipes, cache, inception=not no_inception)))

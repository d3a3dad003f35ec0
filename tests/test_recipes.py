"""Contract tests over every recipe in configs/: it loads, its model exists, its sizes are coherent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from usp.config import load_config
from usp.latent.vae import spec_of
from usp.models import create_model, list_models, model_entry
from usp.sample.run import build_generator

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").rglob("*.yaml"))


def test_there_are_recipes_for_every_task():
    tasks = {load_config(p).run.task for p in RECIPES}
    assert tasks == {"pretrain", "finetune", "probe", "classify", "vae"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads_and_names_a_registered_model(path):
    config = load_config(path)
    if config.run.task == "vae":
        return
    spec = spec_of(config.latent.space)
    assert config.data.image_size % spec.factor == 0
    side = config.data.image_size // spec.factor
    if config.run.task == "finetune":
        assert config.model.name in list_models("dit") + list_models("sit") + list_models("lightningdit")
        with torch.device("meta"):
            model = build_generator(config)
        assert model.x_embedder.proj.in_channels == spec.channels and model.input_size == side
    else:
        entry = model_entry(config.model.name, ("vit", "vit_cls", "vit_lightning"))
        assert side % entry.patch_size == 0


def test_paper_pretraining_recipe_numbers():
    config = load_config(RECIPES[0].parent.parent / "pretrain" / "vit_b_2_sdvae_224.yaml")
    assert config.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert (config.pretrain.mask_ratio, config.optim.betas, config.optim.weight_decay) == (0.75, (0.9, 0.95), 0.05)
    assert (config.optim.warmup_epochs, config.train.epochs, config.data.crop_scale) == (40, 800, (0.2, 1.0))
    with torch.device("meta"):
        model = create_model(config.model.name, latent_size=224 // 8, in_channels=4)
    assert model.num_patches == 196

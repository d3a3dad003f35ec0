"""A latent cache is checked against the recipe's VAE by hashing the VAE's weights file as stored, without
building the model (a cached run's start no longer imports the VAE library for it); where the file's hash is
not the cache's, the model is loaded and hashed as before."""

from __future__ import annotations

import pytest
import torch

from usp.config import load_config
from usp.data.images import FashionMNISTDataset, build_transform
from usp.latent import cache as cache_module
from usp.latent.cache import build_cache, cache_source, vae_fingerprint, verify_cache, weights_file_fingerprint
from usp.latent.small_vae import SmallVAE
from usp.latent.vae import STATS_FILE, LatentSpace


def test_the_stored_files_hash_is_the_loaded_models(tiny_vae_dir, tmp_path):
    small = tmp_path / "small"
    torch.manual_seed(0)
    SmallVAE(width=8).save_pretrained(small)  # the demo's kind of VAE
    (small / STATS_FILE).write_text((tiny_vae_dir / STATS_FILE).read_text())
    for folder in (tiny_vae_dir, small):  # a diffusers AutoencoderKL folder, a usp SmallVAE folder
        assert weights_file_fingerprint(str(folder)) == vae_fingerprint(LatentSpace.load("small-f4", str(folder)))
    assert weights_file_fingerprint(str(tiny_vae_dir)) != weights_file_fingerprint(str(small))
    assert weights_file_fingerprint(str(tmp_path / "absent")) is None
    assert weights_file_fingerprint(None) is None


@pytest.fixture
def cached_recipe(tiny_vae_dir, tmp_path, fmnist_overrides):
    config = load_config(None, [*fmnist_overrides, f"latent.cache={tmp_path / 'cache'}", "data.limit=8"])
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=8)
    build_cache(dataset, LatentSpace.load("small-f4", str(tiny_vae_dir)), 32, tmp_path / "cache", "train",
                progress=False, source=cache_source(config, "train"))
    return config


def test_a_matching_cache_is_verified_without_loading_the_vae(cached_recipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was loaded")

    monkeypatch.setattr(cache_module.LatentSpace, "load", refuse)
    assert len(verify_cache(cached_recipe, ["train"])[0]) == 8


def test_a_file_hash_that_differs_falls_back_to_the_loaded_model(cached_recipe, monkeypatch):
    """A file whose stored form is not the loaded model's (an fp16 file, renamed keys): its hash differs from the
    cache's, and the model is loaded and hashed: the same VAE is still accepted."""
    loads = []
    original = cache_module.LatentSpace.load
    monkeypatch.setattr(cache_module, "weights_file_fingerprint", lambda path: "0" * 64)
    monkeypatch.setattr(cache_module.LatentSpace, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    assert len(verify_cache(cached_recipe, ["train"])[0]) == 8
    assert len(loads) == 1

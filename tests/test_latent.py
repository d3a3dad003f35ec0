"""Latent spaces, the latent cache, and the data path's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from usp.config import load_config
from usp.data.images import FashionMNISTDataset, ImageFolderDataset, build_transform
from usp.latent.cache import LatentCacheDataset, build_cache, read_header
from usp.latent.small_vae import SmallVAE
from usp.latent.vae import STATS_FILE, LatentSpace, moments_to_latents
from usp.train.tasks import build_task


def test_diffusers_folder_loads_with_scale_and_decode_inverts_it(tiny_vae_dir):
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    assert (latent.scale, latent.shift, latent.channels, latent.factor) == (2.0, 0.1, 8, 4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = latent.moments(images)
    mean = moments[:, :8]
    z = latent.encode(images)
    assert torch.allclose(z, (mean - 0.1) * 2.0)
    # decode(z) feeds the VAE exactly the unscaled mean.
    assert torch.allclose(latent.decode(z), latent.vae.decode(mean).sample, atol=1e-5)


def test_sd_vae_space_loads_a_local_autoencoder_kl_folder(tmp_path):
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=64)
    AutoencoderKL(**config).save_pretrained(str(tmp_path / "sd"))
    latent = LatentSpace.load("sd-vae-ft-ema", str(tmp_path / "sd"))
    assert latent.scale == 0.18215 and latent.factor == 8
    assert latent.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="not divisible by the sd-vae-ft-ema VAE factor 8"):
        latent.encode(torch.zeros(1, 3, 60, 60))


def test_posterior_sample_uses_the_given_noise():
    moments = torch.cat([torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), np.log(0.25))], dim=1)
    eps = torch.randn(1, 4, 2, 2)
    assert torch.allclose(moments_to_latents(moments, 0.5, 0.0, eps), 0.5 * (1.0 + 0.5 * eps))


def test_small_vae_roundtrips_through_its_folder(tmp_path):
    vae = SmallVAE(width=16, depth=1)
    vae.save_pretrained(tmp_path / "v")
    (tmp_path / "v" / STATS_FILE).write_text(json.dumps({"scale": 1.5, "shift": 0.0}))
    latent = LatentSpace.load("small-f4", str(tmp_path / "v"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(latent.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_small_vae_with_other_channels_is_refused_for_small_f4(tmp_path):
    SmallVAE(latent_channels=4, width=16).save_pretrained(tmp_path / "v")
    (tmp_path / "v" / STATS_FILE).write_text(json.dumps({"scale": 1.0, "shift": 0.0}))
    with pytest.raises(ValueError, match="this VAE has 4 latent channels but latent space 'small-f4' has 8"):
        LatentSpace.load("small-f4", str(tmp_path / "v"))


def test_small_vae_starts_as_the_patch_pca():
    """After init_from_data the code of the init images has mean 0 and covariance diag(λ)/mean(λ) for the
    top-8 patch-covariance eigenvalues λ, the posterior std is e^-3, and decode(mean) is the rank-8 PCA
    reconstruction of each 4×4 patch (numpy SVD)."""
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 34, 34, generator=generator), 3, stride=1)
    images = smooth * 2 - 1  # correlated pixels, so the spectrum is not flat
    vae = SmallVAE(width=16, depth=1)
    eigenvalues = vae.init_from_data(images)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    posterior = vae.encode(images).latent_dist
    code = posterior.mean.permute(0, 2, 3, 1).reshape(-1, 8).double()
    assert code.mean(0).abs().max() < 1e-4
    expected_cov = torch.diag(eigenvalues.double() / eigenvalues.double().mean())
    assert torch.allclose(torch.cov(code.T), expected_cov, atol=1e-3)
    assert torch.allclose(posterior.std, torch.full_like(posterior.std, np.exp(-3.0)))

    patches = images.reshape(64, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 48).numpy().astype(np.float64)
    centred = patches - patches.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    assert np.allclose(eigenvalues.numpy(), singular[:8] ** 2 / (len(patches) - 1), rtol=1e-4)
    expected = centred @ vt[:8].T @ vt[:8] + patches.mean(0)
    expected = torch.from_numpy(expected).reshape(64, 8, 8, 3, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(64, 3, 32, 32)
    assert torch.allclose(vae.decode(posterior.mean).sample.double(), expected, atol=1e-4)


def test_cache_equals_on_the_fly_latents_and_resumes(tiny_vae_dir, tmp_path):
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=10)
    # An interrupted build: write the first 4, then resume to 10.
    build_cache(torch.utils.data.Subset(dataset, range(4)), latent, 32, tmp_path / "partial", "train", 4,
                progress=False)
    path = build_cache(dataset, latent, 32, tmp_path, "train", batch_size=4, progress=False)
    header = read_header(path)
    assert (header["count"], header["done"], header["latent_space"], header["image_size"]) == (10, 10, "small-f4", 32)
    cached = LatentCacheDataset(tmp_path, "train", "small-f4", 32)
    for index in (0, 7):
        image = dataset[index]["image"][None]
        item = cached[index]
        assert item["label"] == int(dataset.labels[index])
        plain = moments_to_latents(item["moments"][0:1], latent.scale, latent.shift)
        flipped = moments_to_latents(item["moments"][1:2], latent.scale, latent.shift)
        # atol: a batch of 4 and a single image take different float32 convolution paths.
        assert torch.allclose(plain, latent.encode(image), atol=1e-5)
        assert torch.allclose(flipped, latent.encode(image.flip(-1)), atol=1e-5)


def test_interrupted_cache_resumes_from_done(tiny_vae_dir, tmp_path):
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=8)
    path = build_cache(dataset, latent, 32, tmp_path, "train", batch_size=4, progress=False)
    floats = 8 * 2 * 2 * latent.channels * 8 * 8  # images × (plain, flipped) × [mean | logvar] × 8×8
    full = np.array(np.memmap(path, dtype=np.float32, mode="r", offset=4096, shape=(floats,)))
    # Pretend the run died after the first batch: mark done=4 and scribble over the rest.
    header = read_header(path)
    header["done"] = 4
    with open(path, "r+b") as f:
        f.write(json.dumps(header).encode().ljust(4096, b"\0"))
    scribble = np.memmap(path, dtype=np.float32, mode="r+", offset=4096, shape=full.shape)
    scribble[len(full) // 2 :] = 0
    scribble.flush()
    build_cache(dataset, latent, 32, tmp_path, "train", batch_size=4, progress=False)
    assert read_header(path)["done"] == 8
    resumed = np.array(np.memmap(path, dtype=np.float32, mode="r", offset=4096, shape=full.shape))
    assert np.array_equal(resumed, full)


def test_cache_of_another_latent_space_or_size_is_refused(tiny_vae_dir, tmp_path):
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=4)
    build_cache(dataset, latent, 32, tmp_path, "train", progress=False)
    with pytest.raises(ValueError, match="holds small-f4 latents of 32 px images, but the recipe asks for "
                                         "sd-vae-ft-ema at 256 px"):
        LatentCacheDataset(tmp_path, "train", "sd-vae-ft-ema", 256)
    with pytest.raises(FileNotFoundError, match="usp cache-latents"):
        LatentCacheDataset(tmp_path, "val", "small-f4", 32)


def test_pretraining_from_cache_matches_on_the_fly_latents(tiny_vae_dir, tmp_path, fmnist_overrides):
    """The cached path and the on-the-fly path give the same latents for the same sample."""
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=16)
    build_cache(dataset, latent, 32, tmp_path / "cache", "train", progress=False)
    cached = build_task(load_config(None, [*fmnist_overrides, f"latent.cache={tmp_path / 'cache'}"]))
    fly = build_task(load_config(None, [*fmnist_overrides, "data.crop=center", "data.hflip=false"]))
    batch_c = {"moments": torch.stack([cached.train_set[i]["moments"] for i in range(4)]),
               "flip": torch.tensor([False, True, False, True])}
    batch_f = {"image": torch.stack([fly.train_set[i]["image"] for i in range(4)])}
    batch_f["image"][[1, 3]] = batch_f["image"][[1, 3]].flip(-1)
    assert torch.allclose(cached.data.latents(batch_c), fly.data.latents(batch_f), atol=1e-5)


def _write_png(path, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.randint(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_bad_data_gives_clear_errors(tmp_path, fmnist_overrides, tiny_vae_dir):
    with pytest.raises(FileNotFoundError, match="does not exist; set data.root"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path / "noimages")
    _write_png(tmp_path / "data" / "train" / "cat" / "good.png")
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path / "data" / "train", transform=build_transform(32, "center"))
    broken = [i for i, (p, _) in enumerate(dataset.samples) if p.name == "broken.png"][0]
    with pytest.raises(ValueError, match="cannot read image .*broken.png.*remove or replace"):
        dataset[broken]
    with pytest.raises(ValueError, match="data.image_size=30 is not divisible by the small-f4 VAE factor 4"):
        build_task(load_config(None, [*fmnist_overrides, "data.image_size=30"]))


def test_unknown_recipe_keys_and_values_are_named():
    with pytest.raises(ValueError, match="unknown recipe key train.epoch;"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ValueError, match="unknown recipe key trian;"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ValueError, match="pretrain.mask_ratio must be in"):
        load_config(None, ["pretrain.mask_ratio=1.5"])
    with pytest.raises(ValueError, match="latent.sample_posterior must be true or false"):
        load_config(None, ["latent.sample_posterior=maybe"])
    with pytest.raises(ValueError, match="optim.name='adam' is not allowed; choose one of adamw, lars, sgd"):
        load_config(None, ["optim.name=adam"])


def test_cache_recipe_of_a_split_smaller_than_the_limit_serves_any_limit(tiny_vae_dir, tmp_path):
    """`usp cache-latents` (cache_recipe) of a 6-image split at data.limit=10 holds the whole split, so a recipe
    asking for 20 reads it (the demo's --full probe asks for more test images than the split has); a cache cut
    at 4 of the 6 images is refused for a recipe that wants 6."""
    from PIL import Image

    from usp.config import load_config
    from usp.latent.cache import cache_recipe, verify_cache

    for i in range(6):
        (tmp_path / "data" / "val" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(tmp_path / "data" / "val" / f"c{i % 2}" / f"{i}.png")

    def recipe(cache: str, limit: int) -> object:
        return load_config(None, ["data.source=folder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
                                  "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"data.limit={limit}",
                                  f"latent.cache={tmp_path / cache}", "data.num_workers=0", "run.device=cpu"])

    made = cache_recipe(recipe("whole", 10), ["val"], progress=False)
    assert made["val"]["images"] == 6 and made["val"]["tokens"] is None
    assert len(verify_cache(recipe("whole", 20), ["val"])[0]) == 6
    cache_recipe(recipe("cut", 4), ["val"], progress=False)
    assert len(verify_cache(recipe("cut", 3), ["val"])[0]) == 3
    with pytest.raises(ValueError, match="4 images \\(cache\\) vs 6 \\(recipe data.limit\\)"):
        verify_cache(recipe("cut", 6), ["val"])

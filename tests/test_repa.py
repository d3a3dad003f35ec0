"""REPA (issue 17): the loss by hand, the frozen teacher, the projector in the optimiser and the resume state and
out of the sampling weights, the teacher tokens cached beside the latents (flip for flip), and the key layouts of
DINOv2 (timm) and of REPA's SiT checkpoints. Teachers are tiny timm ViTs with random weights."""

from __future__ import annotations

import math

import pytest
import torch

from usp.config import load_config
from usp.latent.features import load_repa_teacher
from usp.models.repa import (
    attach_projectors,
    build_teacher_encoder,
    load_teacher_weights,
    match_grid,
    projection_loss,
    save_teacher,
)
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
# A tiny DINOv2-shaped teacher: 32 px, patch 4 -> an 8x8 grid (the generator's is 4x4: tokens are interpolated),
# one register token besides the class token (both must be dropped).
TINY_TEACHER = {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "reg_tokens": 1}


def test_loss_is_minus_the_mean_cosine_by_hand():
    # N=2, T=3, D=4. Cosines by construction: 1, 0, −1 (sample 0); 1/2, √2/2, 0 (sample 1).
    z = torch.tensor([[[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]],
                      [[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 5]]])
    y = torch.tensor([[[2.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]],
                      [[1.0, math.sqrt(3), 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]])
    cosines = [1, 0, -1, 0.5, math.sqrt(2) / 2, 0]
    expected = -sum(cosines) / 6
    assert projection_loss([z], [y]).item() == pytest.approx(expected, abs=1e-6)
    # REPA's loss.py order (per sample: mean over tokens; summed over the batch, / batch, then over teachers).
    per_sample = [-(torch.nn.functional.normalize(z[j], dim=-1) * torch.nn.functional.normalize(y[j], dim=-1))
                  .sum(-1).mean() for j in range(2)]
    two = projection_loss([z, z], [y, -y])  # teachers averaged: −mean(c) and +mean(c) cancel
    assert (sum(per_sample) / 2).item() == pytest.approx(expected, abs=1e-6) and abs(two.item()) < 1e-6
    with pytest.raises(ValueError, match="match_grid"):
        projection_loss([z], [y[:, :2]])


def test_match_grid_area_averages_each_generator_patch():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # (N, 4x4, D)
    out = match_grid(tokens, 2)  # (N, 2x2, D)
    grid = tokens.reshape(2, 4, 4, 3)
    by_hand = grid.reshape(2, 2, 2, 2, 2, 3).mean(dim=(2, 4)).reshape(2, 4, 3)  # mean of each 2x2 block
    assert torch.allclose(out, by_hand)
    assert match_grid(tokens, 4) is tokens


def test_teacher_tokens_drop_cls_and_registers_resize_and_normalise(tmp_path):
    encoder = build_teacher_encoder("vit_tiny_patch16_224", **TINY_TEACHER)
    save_teacher(encoder, tmp_path / "t.safetensors", TINY_TEACHER)
    teacher = load_repa_teacher("vit_tiny_patch16_224", str(tmp_path / "t.safetensors"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1  # half the teacher's resolution: resized to 32
    tokens = teacher.tokens(images)
    x = ((images + 1) / 2 - teacher.mean) / teacher.std
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    full = encoder.eval().forward_features(x)  # (N, 1 + 1 + 64, D)
    assert full.shape[1] == 66 and tokens.shape == (2, 64, 16)
    assert torch.allclose(tokens, full[:, 2:], atol=1e-6)
    # The teacher's final state equals the file (strict load, not a fresh random init).
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), teacher.encoder.state_dict().values()))


def test_dinov2_layout_loads_strictly_and_a_missing_key_names_itself():
    import timm

    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224)
        encoder = build_teacher_encoder("vit_base_patch14_dinov2", img_size=224)
    state = reference.state_dict()
    assert state["pos_embed"].shape == (1, 257, 768) and "blocks.11.ls2.gamma" in state
    load_teacher_weights(encoder, state, "dinov2-b.safetensors", assign=True)
    broken = {k: v for k, v in state.items() if k != "blocks.3.attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"teacher weights dinov2-b.safetensors do not match.*missing keys "
                                         r"\['blocks.3.attn.qkv.weight'\].*repa.teacher"):
        load_teacher_weights(encoder, broken, "dinov2-b.safetensors", assign=True)


def test_projector_keys_are_repas():
    from usp.models import create_model

    with torch.device("meta"):
        sit = create_model("sit_xl_2", input_size=32)
        attach_projectors(sit, [768])
    shapes = {k: tuple(v.shape) for k, v in sit.state_dict().items() if k.startswith("projectors.")}
    # REPA models/sit.py: build_mlp(1152, 2048, 768) = Linear, SiLU, Linear, SiLU, Linear.
    assert shapes == {"projectors.0.0.weight": (2048, 1152), "projectors.0.0.bias": (2048,),
                      "projectors.0.2.weight": (2048, 2048), "projectors.0.2.bias": (2048,),
                      "projectors.0.4.weight": (768, 2048), "projectors.0.4.bias": (768,)}


# --------------------------------------------------------------------------------------------
# Training with REPA on cached latents + cached teacher tokens
# --------------------------------------------------------------------------------------------


@pytest.fixture
def repa_recipe(tiny_vae_dir, tmp_path):
    """A 32-image latent cache of Fashion-MNIST, a tiny teacher file and its tokens beside the cache."""
    from usp.data.images import FashionMNISTDataset, build_transform
    from usp.latent.cache import LatentCacheDataset, build_cache
    from usp.latent.features import build_features, features_dir
    from usp.latent.vae import LatentSpace

    cache, weights = tmp_path / "cache", tmp_path / "teacher.safetensors"
    images = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=32)
    build_cache(images, LatentSpace.load("small-f4", str(tiny_vae_dir)), 32, cache, "train", progress=False)
    torch.manual_seed(3)
    save_teacher(build_teacher_encoder("vit_tiny_patch16_224", **TINY_TEACHER), weights, TINY_TEACHER)
    teacher = load_repa_teacher("vit_tiny_patch16_224", str(weights))
    folder = features_dir(cache, "vit_tiny_patch16_224", str(weights))
    build_features(teacher, images, LatentCacheDataset(cache, "train", "small-f4", 32), folder, "train", grid=4)
    overrides = [
        "run.task=finetune", "data.source=fashion_mnist", "data.image_size=32", "data.limit=32",
        "data.num_workers=0", "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"latent.cache={cache}",
        f"run.out_dir={tmp_path / 'runs'}", "model.name=sit_t_2", "model.num_classes=10", "model.affine_norms=true",
        "generation.method=transport", "generation.sampler=ode", "generation.ode_method=euler",
        "generation.sample_steps=2", "generation.grid_per_class=1", "generation.grid_classes=2",
        "train.global_batch=8", "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2",
        "train.ema_decay=0.9", "train.tensorboard=false", "train.progress=false", "optim.lr=1e-3",
        "optim.warmup_epochs=0", "repa.enabled=true", "repa.teacher=vit_tiny_patch16_224",
        f"repa.teacher_weights={weights}", "repa.depth=2", "repa.projector_dim=32",
    ]
    return overrides, images, teacher


def test_cached_tokens_pair_each_latent_flip_with_its_image_flip(repa_recipe):
    overrides, images, teacher = repa_recipe
    task = build_task(load_config(None, [*overrides, "run.name=pair"]))
    item = task.train_set[5]
    x = images[5]["image"].unsqueeze(0)
    plain, flipped = (match_grid(teacher.tokens(v), 4)[0] for v in (x, x.flip(-1)))
    assert torch.allclose(item["repa"][0], plain, atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.allclose(item["repa"][1], flipped, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(plain, flipped, atol=1e-2)
    batch = {"repa": item["repa"].unsqueeze(0).repeat(2, 1, 1, 1), "flip": torch.tensor([False, True])}
    picked = task._repa_targets(batch)
    assert torch.equal(picked[0], item["repa"][0]) and torch.equal(picked[1], item["repa"][1])


def test_online_teacher_on_cached_latents_sees_the_flip_of_its_latent(repa_recipe):
    """latent.cache + repa.features=online: each item carries its cached moments and its image; the per-sample
    flip coin picks the flipped latent and flips the image the teacher sees, together."""
    overrides, images, teacher = repa_recipe
    config = load_config(None, [*overrides, "repa.features=online", "run.name=online", "train.max_steps=2"])
    task = build_task(config)
    assert not task.repa_cached and task.data.cached
    item = task.train_set[5]
    assert torch.equal(item["image"], images[5]["image"])  # the cache's own crop, unflipped
    seen = []
    original = task.teacher.tokens
    task.teacher.tokens = lambda x: (seen.append(x.clone()), original(x))[1]
    batch = {"moments": item["moments"][None].repeat(2, 1, 1, 1, 1), "image": item["image"][None].repeat(2, 1, 1, 1),
             "flip": torch.tensor([False, True]), "label": torch.tensor([item["label"]] * 2)}
    targets = task._repa_targets(batch)
    x = images[5]["image"]
    assert torch.equal(seen[0][0], x) and torch.equal(seen[0][1], x.flip(-1))
    latents = task.data.latents(batch)  # the same coin picks the cached orientation
    plain, flipped = (task.data.latents({"moments": item["moments"][None], "flip": torch.tensor([f])})[0]
                      for f in (False, True))
    assert torch.equal(latents[0], plain) and torch.equal(latents[1], flipped) and not torch.equal(plain, flipped)
    torch.testing.assert_close(targets[1], match_grid(original(x.flip(-1)[None]), 4)[0])
    task.teacher.tokens = original
    result = train(config, task, CPU, resume=None)  # and it trains end to end on the paired data
    assert all(math.isfinite(r["repa_loss"]) for r in result["history"])


def test_repa_trains_the_projector_not_the_teacher_and_resumes_bitwise(repa_recipe, interrupt_loss):
    overrides, _, _ = repa_recipe
    config = load_config(None, [*overrides, "run.name=straight"])
    task = build_task(config)
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    projector_before = {k: v.clone() for k, v in task.model.projectors.state_dict().items()}
    result = train(config, task, CPU, resume=None)
    assert all(torch.equal(v, task.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.grad is None for p in task.teacher.parameters())
    assert not torch.equal(projector_before["0.4.weight"], task.model.projectors[0][4].weight)
    assert all(math.isfinite(r["repa_loss"]) and -1 <= r["repa_loss"] <= 1 for r in result["history"])
    assert all(r["loss"] == pytest.approx(r["base_loss"] + 0.5 * r["repa_loss"], rel=1e-5) for r in result["history"])
    state = ckpt.load_state(sorted((config.run_dir / "checkpoints").glob("state_*.pt"))[-1])
    assert "projectors.0.0.weight" in state["model"] and "projectors.0.0.weight" in state["ema"]
    # Resume: kill in step 3 (after the step-2 checkpoint), run the same command again.
    split = load_config(None, [*overrides, "run.name=split"])
    task2 = build_task(split)
    interrupt_loss(task2, 3)
    with pytest.raises(KeyboardInterrupt):
        train(split, task2, CPU)
    train(split, build_task(split), CPU)
    a = ckpt.load_state(config.run_dir / "checkpoints" / "state_0000004.pt")
    b = ckpt.load_state(split.run_dir / "checkpoints" / "state_0000004.pt")
    for key in ("model", "ema", "optimizer", "data", "rng_cpu"):
        assert ckpt.digest(a[key]) == ckpt.digest(b[key]), key


def test_projector_is_optimised_and_left_out_of_the_sampling_weights(repa_recipe, tmp_path):
    from usp.sample.run import build_generator, run_sampling
    from usp.train.engine import BatchPlan, build_state

    overrides, _, _ = repa_recipe
    config = load_config(None, [*overrides, "run.name=export", "train.max_steps=2"])
    task = build_task(config)
    state = build_state(config, task, CPU, BatchPlan.of(config.train, 0, len(task.train_set), CPU))
    optimised = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in task.model.projectors.parameters())
    assert not any(id(p) in optimised for p in task.teacher.parameters())
    train(config, build_task(config), CPU, resume=None)
    path = ckpt.latest_weights(config.run_dir / "checkpoints")
    weights, meta = load_weights(path)
    assert meta["ema"] and not any(k.startswith("projectors.") for k in weights)
    plain = build_generator(config)
    plain.load_state_dict(weights, strict=True)
    npz = run_sampling(path, [], out_dir=tmp_path / "samples", num_samples=2, batch_size=2)
    import numpy as np

    with np.load(npz) as samples:
        assert samples["arr_0"].shape == (2, 32, 32, 3) and samples["arr_0"].std() > 0


def test_dit_from_usp_with_online_teacher_tokens(tiny_vae_dir, tmp_path):
    """DiT (DDPM), transferred from a USP checkpoint, teacher run on the training images (no latent cache)."""
    weights = tmp_path / "teacher.safetensors"
    save_teacher(build_teacher_encoder("vit_tiny_patch16_224", **TINY_TEACHER), weights, TINY_TEACHER)
    common = ["data.source=fashion_mnist", "data.image_size=32", "data.limit=16", "data.num_workers=0",
              "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"run.out_dir={tmp_path / 'runs'}",
              "train.global_batch=8", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
              "train.tensorboard=false", "train.progress=false", "optim.warmup_epochs=0"]
    pre = load_config(None, [*common, "model.name=vit_t_2", "run.name=pre"])
    train(pre, build_task(pre), CPU, resume=None)
    usp_weights = ckpt.latest_weights(pre.run_dir / "checkpoints")
    config = load_config(None, [*common, "run.task=finetune", "run.name=dit", "model.name=dit_t_2",
                                f"model.init={usp_weights}", "model.affine_norms=true", "model.num_classes=10",
                                "generation.sampler=ddim", "generation.sample_steps=ddim2",
                                "generation.grid_per_class=1", "generation.grid_classes=2", "repa.enabled=true",
                                "repa.teacher=vit_tiny_patch16_224", f"repa.teacher_weights={weights}",
                                "repa.depth=1", "repa.projector_dim=16"])
    task = build_task(config)
    source, _ = load_weights(usp_weights)
    assert torch.equal(task.model.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert not task.repa_cached
    result = train(config, task, CPU, resume=None)
    assert all(math.isfinite(r["repa_loss"]) for r in result["history"])
    saved, _ = load_weights(ckpt.latest_weights(config.run_dir / "checkpoints"))
    from usp.sample.run import build_generator

    build_generator(config).load_state_dict(saved, strict=True)


def test_repa_recipe_errors_name_the_fix(repa_recipe):
    overrides, _, _ = repa_recipe
    with pytest.raises(ValueError, match="repa.depth=9 but sit_t_2 has 4 blocks"):
        build_task(load_config(None, [*overrides, "run.name=e1", "repa.depth=9"]))
    with pytest.raises(ValueError, match="repa.teacher_weights is not set"):
        build_task(load_config(None, [*overrides, "run.name=e2", "repa.teacher_weights=null"]))


def test_an_offline_teacher_download_names_the_local_weights_key(monkeypatch):
    import timm

    def offline(*args, **kwargs):  # what huggingface_hub raises without network and without the file cached
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"REPA teacher 'vit_base_patch14_dinov2' \(repa.teacher_weights=timm"
                                                r".*set repa.teacher_weights to a local file"):
        load_repa_teacher("vit_base_patch14_dinov2", "timm")


def test_tokens_made_by_another_teacher_are_refused(repa_recipe, tmp_path):
    overrides, _, _ = repa_recipe
    other = tmp_path / "other" / "teacher.safetensors"  # same file name, so the same token folder is looked up
    other.parent.mkdir()
    torch.manual_seed(4)
    save_teacher(build_teacher_encoder("vit_tiny_patch16_224", **TINY_TEACHER), other, TINY_TEACHER)
    with pytest.raises(ValueError, match="were not made by this teacher / cache: teacher_sha256"):
        build_task(load_config(None, [*overrides, "run.name=other", f"repa.teacher_weights={other}"]))


def test_a_teacher_file_loads_at_another_resolution_with_its_position_table_resampled(tmp_path):
    import timm

    encoder = build_teacher_encoder("vit_tiny_patch16_224", **TINY_TEACHER)
    save_teacher(encoder, tmp_path / "t.safetensors", TINY_TEACHER)
    teacher = load_repa_teacher("vit_tiny_patch16_224", str(tmp_path / "t.safetensors"), img_size=16)
    assert teacher.image_size == 16 and teacher.grid == 4
    table = encoder.pos_embed  # (1, 2 + 64, D): cls + register, then the 8x8 grid
    expected = timm.layers.resample_abs_pos_embed(table, [4, 4], num_prefix_tokens=2)
    assert torch.allclose(teacher.encoder.pos_embed, expected)
    assert teacher.tokens(torch.zeros(1, 3, 16, 16)).shape == (1, 16, 16)


def test_cache_latents_builds_the_teacher_tokens_a_repa_recipe_trains_on(repa_recipe, tmp_path, capsys):
    """`usp cache-latents RECIPE` on a recipe with REPA on cached tokens writes the tokens beside the new latents
    (the user's path; no script), equal to the fixture's own build, and skips them when run again."""
    import numpy as np
    import yaml

    from usp.cli import main
    from usp.config import apply_overrides

    overrides, _, _ = repa_recipe
    cache = tmp_path / "cli_cache"
    values = apply_overrides({}, [*overrides, f"latent.cache={cache}", "run.name=cli"])
    recipe = tmp_path / "repa.yaml"
    recipe.write_text(yaml.safe_dump(values))
    main(["cache-latents", str(recipe), "--splits", "train"])
    assert "REPA teacher tokens ->" in capsys.readouterr().out
    built = next(cache.glob("repa-*/train.npy"))
    reference = next((tmp_path / "cache").glob("repa-*/train.npy"))  # the fixture's build_features, same images
    assert np.array_equal(np.load(built), np.load(reference))
    main(["cache-latents", str(recipe), "--splits", "train"])  # already there: not rebuilt
    assert "REPA teacher tokens ->" not in capsys.readouterr().out
    task = build_task(load_config(recipe))
    assert task.train_set[0]["repa"].shape == (2, 16, task.teacher.dim)

"""Latent spaces by name: the LDM-layout VA-VAE f16d32 and KL-16, per-channel normalisation, REPA-E's E2E-VAE.

The LDM key set and shapes are written here from LDM's `Encoder`/`Decoder` definition (the layout LightningDiT's
`vavae-imagenet256-f16d32-dinov2.pt` and MAR's `kl16.ckpt` hold), independently of usp's key conversion, and a
functional LDM forward over those keys is the reference the converted diffusers model must reproduce.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usp.latent import vae as vae_module
from usp.latent.cache import build_cache, read_header
from usp.latent.ldm import (
    KL16_LAYOUT,
    VAVAE_F16D32_LAYOUT,
    LdmLayout,
    diffusers_config,
    vae_from_ldm_state,
)
from usp.latent.ldm import ldm_key_shapes as ldm_shapes
from usp.latent.ldm import random_ldm_state as random_state
from usp.latent.vae import LatentSpace, denormalise, moments_to_latents, norm_fingerprint, normalise, scale_and_shift

# A VA-VAE-shaped tiny layout: the same code path (5 levels, f16, 32 latent channels, attention at the
# coarsest level of encoder and decoder) with 8..32 wide convolutions, so 64 px images run in milliseconds.
TINY_VAVAE = LdmLayout(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, resolution=64,
                       encoder_attn=(4,), decoder_attn=(4,), norm_groups=4,
                       extra_prefixes=VAVAE_F16D32_LAYOUT.extra_prefixes)
# What LightningDiT's training checkpoint holds besides the autoencoder (vavae/ldm/models/autoencoder.py:
# self.loss, self.foundation_model, self.linear_proj with reverse_proj 32 -> 1024).
TRAINING_ONLY = {"loss.logvar": (), "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
                 "loss.discriminator.main.0.weight": (64, 3, 4, 4),
                 "foundation_model.model.blocks.0.attn.qkv.weight": (3072, 1024),
                 "linear_proj.weight": (1024, 32, 1, 1)}


# The LDM forward, written over the LDM keys (the reference for the conversion).
def _gn(h, p, key, groups):
    return F.group_norm(h, groups, p[f"{key}.weight"], p[f"{key}.bias"], eps=1e-6)


def _resnet(h, p, key, groups):
    x = F.conv2d(F.silu(_gn(h, p, f"{key}.norm1", groups)), p[f"{key}.conv1.weight"], p[f"{key}.conv1.bias"], padding=1)
    x = F.conv2d(F.silu(_gn(x, p, f"{key}.norm2", groups)), p[f"{key}.conv2.weight"], p[f"{key}.conv2.bias"], padding=1)
    if f"{key}.nin_shortcut.weight" in p:
        h = F.conv2d(h, p[f"{key}.nin_shortcut.weight"], p[f"{key}.nin_shortcut.bias"])
    return h + x


def _attn(h, p, key, groups):
    n = _gn(h, p, f"{key}.norm", groups)
    q, k, v = (F.conv2d(n, p[f"{key}.{m}.weight"], p[f"{key}.{m}.bias"]).flatten(2) for m in "qkv")  # (B, C, L)
    w = torch.softmax(q.transpose(1, 2) @ k * q.shape[1] ** -0.5, dim=-1)  # (B, Lq, Lk)
    out = (v @ w.transpose(1, 2)).view_as(h)
    return h + F.conv2d(out, p[f"{key}.proj_out.weight"], p[f"{key}.proj_out.bias"])


def ldm_encode(x, p, layout: LdmLayout):
    g, n = layout.norm_groups, len(layout.ch_mult)
    h = F.conv2d(x, p["encoder.conv_in.weight"], p["encoder.conv_in.bias"], padding=1)
    for level in range(n):
        for i in range(layout.num_res_blocks):
            h = _resnet(h, p, f"encoder.down.{level}.block.{i}", g)
            if f"encoder.down.{level}.attn.{i}.q.weight" in p:
                h = _attn(h, p, f"encoder.down.{level}.attn.{i}", g)
        if level != n - 1:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), p[f"encoder.down.{level}.downsample.conv.weight"],
                         p[f"encoder.down.{level}.downsample.conv.bias"], stride=2)
    h = _resnet(_attn(_resnet(h, p, "encoder.mid.block_1", g), p, "encoder.mid.attn_1", g), p, "encoder.mid.block_2", g)
    h = F.conv2d(F.silu(_gn(h, p, "encoder.norm_out", g)), p["encoder.conv_out.weight"], p["encoder.conv_out.bias"],
                 padding=1)
    return F.conv2d(h, p["quant_conv.weight"], p["quant_conv.bias"])


def ldm_decode(z, p, layout: LdmLayout):
    g, n = layout.norm_groups, len(layout.ch_mult)
    h = F.conv2d(z, p["post_quant_conv.weight"], p["post_quant_conv.bias"])
    h = F.conv2d(h, p["decoder.conv_in.weight"], p["decoder.conv_in.bias"], padding=1)
    h = _resnet(_attn(_resnet(h, p, "decoder.mid.block_1", g), p, "decoder.mid.attn_1", g), p, "decoder.mid.block_2", g)
    for level in reversed(range(n)):
        for i in range(layout.num_res_blocks + 1):
            h = _resnet(h, p, f"decoder.up.{level}.block.{i}", g)
            if f"decoder.up.{level}.attn.{i}.q.weight" in p:
                h = _attn(h, p, f"decoder.up.{level}.attn.{i}", g)
        if level != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, p[f"decoder.up.{level}.upsample.conv.weight"], p[f"decoder.up.{level}.upsample.conv.bias"],
                         padding=1)
    h = F.silu(_gn(h, p, "decoder.norm_out", g))
    return F.conv2d(h, p["decoder.conv_out.weight"], p["decoder.conv_out.bias"], padding=1)


def meta_state(layout: LdmLayout, extras: dict | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in {**ldm_shapes(layout), **(extras or {})}.items()}


# ---- 1. the real checkpoint layout loads strictly -------------------------------------------------------------

def test_vavae_f16d32_real_key_set_loads_strictly_and_other_keys_are_named():
    state = meta_state(VAVAE_F16D32_LAYOUT, TRAINING_ONLY)
    vae = vae_from_ldm_state(state, VAVAE_F16D32_LAYOUT)
    ldm_params = sum(int(torch.tensor(s).prod()) for s in ldm_shapes(VAVAE_F16D32_LAYOUT).values())
    assert sum(v.numel() for v in vae.state_dict().values()) == ldm_params  # nothing dropped, nothing invented
    assert vae.config["latent_channels"] == 32 and len(vae.config["block_out_channels"]) == 5  # f16: 4 halvings
    # attention at 16 px: the coarsest level, in encoder (2 blocks) and decoder (3 blocks)
    assert sum(k.startswith("encoder.down.4.attn.") for k in state) == 2 * 10
    assert sum(k.startswith("decoder.up.4.attn.") for k in state) == 3 * 10
    assert len(vae.encoder.down_blocks[4].attentions) == 2 and len(vae.decoder.up_blocks[0].attentions) == 3
    with pytest.raises(ValueError, match=r"model_ema\.decoder\.conv_in\.weight"):
        vae_from_ldm_state({**state, "model_ema.decoder.conv_in.weight": torch.empty(1, device="meta")},
                           VAVAE_F16D32_LAYOUT)
    missing = {k: v for k, v in state.items() if k != "decoder.up.4.attn.2.q.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 weight.*decoder\.up_blocks\.0\.attentions\.2\.to_q\.weight"):
        vae_from_ldm_state(missing, VAVAE_F16D32_LAYOUT)
    # a KL-16 checkpoint is not a VA-VAE one: its decoder lacks the 16 px attention; 16 latent channels differ
    with pytest.raises(ValueError, match=r"lacks 30 weight\(s\)"):
        vae_from_ldm_state(meta_state(KL16_LAYOUT), VAVAE_F16D32_LAYOUT)
    with pytest.raises(ValueError, match=r"shapes differ.*encoder\.conv_out\.weight \(32, 512, 3, 3\) vs \(64, 512"):
        vae_from_ldm_state(meta_state(dataclasses.replace(KL16_LAYOUT, decoder_attn=(16,))), VAVAE_F16D32_LAYOUT)


def test_kl16_layout_has_the_encoder_attention_mars_checkpoint_holds():
    vae = vae_from_ldm_state(meta_state(KL16_LAYOUT), KL16_LAYOUT)
    assert diffusers_config(KL16_LAYOUT)["down_block_types"][-1] == "AttnDownEncoderBlock2D"
    assert all(t == "UpDecoderBlock2D" for t in diffusers_config(KL16_LAYOUT)["up_block_types"])
    assert len(vae.encoder.down_blocks[4].attentions) == 2
    with pytest.raises(ValueError, match="not part of this LDM autoencoder"):  # no training-only keys declared
        vae_from_ldm_state(meta_state(KL16_LAYOUT, {"loss.logvar": ()}), KL16_LAYOUT)


# ---- 2. the conversion computes what the LDM network computes -------------------------------------------------

def test_converted_vae_matches_the_ldm_forward():
    torch.manual_seed(0)
    state = random_state(TINY_VAVAE)
    vae = vae_from_ldm_state({**state, "linear_proj.weight": torch.randn(16, 32, 1, 1)}, TINY_VAVAE).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        moments = vae.encode(x).latent_dist.parameters
        ref = ldm_encode(x, state, TINY_VAVAE)
        z = torch.randn(2, 32, 4, 4)
        out, ref_out = vae.decode(z).sample, ldm_decode(z, state, TINY_VAVAE)
    assert moments.shape == (2, 64, 4, 4)
    assert torch.allclose(moments, ref, atol=1e-5, rtol=1e-4), (moments - ref).abs().max()
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4), (out - ref_out).abs().max()


# ---- 3. per-channel normalisation -----------------------------------------------------------------------------

def test_per_channel_normalisation_by_hand_and_round_trip():
    # 2 channels: mean (1, −2), std (2, 0.5), multiplier 1.5 -> scale = 1.5 / std = (0.75, 3), shift = mean
    scale, shift = (0.75, 3.0), (1.0, -2.0)
    x = torch.tensor([[[[3.0]], [[-1.0]]]])  # (1, 2, 1, 1)
    z = normalise(x, scale, shift)
    assert torch.allclose(z.flatten(), torch.tensor([(3 - 1) / 2 * 1.5, (-1 + 2) / 0.5 * 1.5]))  # 1.5, 3.0
    zz = torch.randn(4, 2, 3, 3)
    assert torch.allclose(normalise(denormalise(zz, scale, shift), scale, shift), zz, atol=1e-6)
    moments = torch.cat([x, torch.zeros_like(x)], dim=1)  # [mean | logvar]
    assert torch.equal(moments_to_latents(moments, scale, shift), z)  # the cache path applies the same
    with pytest.raises(ValueError, match="2 channels"):
        normalise(torch.zeros(1, 3, 2, 2), scale, shift)


@pytest.fixture
def tiny_vavae(tmp_path, monkeypatch):
    """A tiny VA-VAE-layout checkpoint as LightningDiT saves it ({"state_dict": …} with training-only keys),
    its latents_stats.pt beside it, and the va-vae-f16d32 space pointed at the tiny layout."""
    spec = dataclasses.replace(vae_module.LATENT_SPACES["va-vae-f16d32"], layout=TINY_VAVAE)
    monkeypatch.setitem(vae_module.LATENT_SPACES, "va-vae-f16d32", spec)
    folder = tmp_path / "vavae"
    folder.mkdir()
    extras = {"loss.logvar": (), "foundation_model.model.cls_token": (1, 1, 16), "linear_proj.weight": (16, 32, 1, 1)}
    torch.save({"state_dict": random_state(TINY_VAVAE, 0, extras)}, folder / "vavae.pt")
    g = torch.Generator().manual_seed(1)
    stats = {"mean": torch.randn(1, 32, 1, 1, generator=g), "std": 0.5 + torch.rand(1, 32, 1, 1, generator=g)}
    torch.save(stats, folder / "latents_stats.pt")
    return folder / "vavae.pt", stats


def test_vavae_space_applies_the_published_statistics_per_channel(tiny_vavae):
    path, stats = tiny_vavae
    latent = LatentSpace.load("va-vae-f16d32", str(path))
    assert (latent.channels, latent.factor) == (32, 16)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = latent.moments(x)[:, :32]
    expected = (mean - stats["mean"]) / stats["std"] * 1.0  # LightningDiT: (x − mean) / std × multiplier
    z = latent.encode(x)
    assert torch.allclose(z, expected, atol=1e-5)
    assert torch.allclose(normalise(denormalise(z, latent.scale, latent.shift), latent.scale, latent.shift), z,
                          atol=1e-5)
    # decode undoes the statistics before the VAE decoder
    with torch.no_grad():
        raw = latent.vae.decode(z * stats["std"] + stats["mean"]).sample
    assert torch.allclose(latent.decode(z), raw, atol=1e-5)
    # the cache path reads the same numbers from the file without the VAE
    assert scale_and_shift("va-vae-f16d32", str(path)) == (latent.scale, latent.shift)
    (path.parent / "latents_stats.pt").unlink()
    with pytest.raises(FileNotFoundError, match="latents_stats.pt"):
        scale_and_shift("va-vae-f16d32", str(path))
    torch.save({"mean": torch.zeros(16), "std": torch.ones(16)}, path.parent / "latents_stats.pt")
    with pytest.raises(ValueError, match="16 means and 16 stds but latent space 'va-vae-f16d32' has 32"):
        scale_and_shift("va-vae-f16d32", str(path))


def test_cache_records_the_statistics_and_refuses_other_ones(tiny_vavae, tmp_path):
    path, stats = tiny_vavae

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1, "label": i}

    latent = LatentSpace.load("va-vae-f16d32", str(path))
    cache = build_cache(Images(), latent, 64, tmp_path / "cache", "train", batch_size=2, progress=False)
    assert read_header(cache)["norm_sha256"] == latent.norm_fingerprint
    torch.save({"mean": stats["mean"] + 1.0, "std": stats["std"]}, path.parent / "latents_stats.pt")
    other = LatentSpace.load("va-vae-f16d32", str(path))
    assert other.norm_fingerprint != latent.norm_fingerprint
    with pytest.raises(ValueError, match="other latent statistics.*norm_sha256"):
        build_cache(Images(), other, 64, tmp_path / "cache", "train", batch_size=2, progress=False)


# ---- 4. E2E-VAE: the diffusers path of sd-vae, constants from its config.json ---------------------------------

E2E_TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_e2e_vae_loads_through_the_diffusers_path_with_its_config_constants(tmp_path, per_channel):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    extra = (dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 4.0]) if per_channel
             else dict(shift_factor=0.25))
    AutoencoderKL(**E2E_TINY, scaling_factor=0.5, **extra).save_pretrained(str(tmp_path / "e2e"))
    latent = LatentSpace.load("e2e-vae", str(tmp_path / "e2e"))
    assert (latent.channels, latent.factor) == (4, 8)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mean = latent.moments(x)[:, :4]
    if per_channel:  # diffusers' SDXL convention: (x − mean_c) · scaling_factor / std_c
        m, s = torch.tensor(extra["latents_mean"]).view(1, 4, 1, 1), torch.tensor(extra["latents_std"]).view(1, 4, 1, 1)
        expected = (mean - m) * 0.5 / s
    else:
        expected = (mean - 0.25) * 0.5
    assert torch.allclose(latent.encode(x), expected, atol=1e-6)
    assert torch.allclose(latent.decode(latent.encode(x)), latent.vae.decode(mean).sample, atol=1e-5)
    config = json.loads((tmp_path / "e2e" / "config.json").read_text())
    config.pop("scaling_factor")
    (tmp_path / "e2e" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no scaling_factor"):
        scale_and_shift("e2e-vae", str(tmp_path / "e2e"))


@pytest.mark.parametrize("size", ["b", "xl"])
def test_full_size_patch1_models_take_vavae_latents_and_the_usp_transfer(size):
    """vit_{b,xl}_1 pretrained on 224 px VA-VAE latents (14×14×32) -> sit_{b,xl}_1 at 256 px (16×16×32), full size on
    the meta device: the 32-channel patch embedding and every block weight transfer, the grid is resized."""
    from usp.models import SIZES, create_model
    from usp.models.transfer import transfer_weights

    with torch.device("meta"):
        mae = create_model(f"vit_{size}_1", latent_size=14, in_channels=32)
        sit = create_model(f"sit_{size}_1", input_size=16, in_channels=32, num_classes=1000, affine_norms=True)
    report = transfer_weights(mae.state_dict(), sit)
    assert sit.x_embedder.proj.weight.shape == (SIZES[size].width, 32, 1, 1) and sit.pos_embed.shape[1] == 256
    assert "x_embedder.proj.weight" in report.loaded and report.resized == ["pos_embed"]
    blocks = [k for k in sit.state_dict() if k.startswith("blocks.") and "adaLN" not in k]
    assert len(blocks) == SIZES[size].depth * 12 and set(blocks) <= set(report.loaded)


# ---- 5. end to end on VA-VAE latents: cache, USP pretraining, SiT fine-tuning from it --------------------------

def test_vavae_latents_cache_pretrain_and_sit_finetune(tiny_vavae, tmp_path):
    """64 px Fashion-MNIST through the tiny VA-VAE-layout VAE (f16: 4×4×32 latents, patch-1 models), the CLI's
    cache, 2 steps of USP pretraining (vit_t_1) on the cache, then 2 steps of SiT (sit_t_1) from its weights."""
    import numpy as np

    from usp.cli import main
    from usp.config import load_config
    from usp.run import checkpoint as ckpt
    from usp.run.weights import load_weights
    from usp.train.engine import Runtime, train
    from usp.train.tasks import build_task

    path, stats = tiny_vavae
    cpu = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
    common = ["data.source=fashion_mnist", "data.image_size=64", "data.limit=8", "data.num_workers=0",
              "latent.space=va-vae-f16d32", f"latent.path={path}", f"latent.cache={tmp_path / 'cache'}",
              f"run.out_dir={tmp_path / 'runs'}", "train.global_batch=4", "train.max_steps=2", "train.log_every=1",
              "train.ckpt_every=2", "train.tensorboard=false", "train.progress=false", "optim.warmup_epochs=0"]
    main(["cache-latents", "fmnist/pretrain", "--splits", "train", "--batch-size", "4", *common])
    assert read_header(tmp_path / "cache" / "train.latents")["channels"] == 32

    config = load_config(None, [*common, "model.name=vit_t_1", "run.name=pre"])
    task = build_task(config)
    item = task.train_set[0]
    batch = {"moments": item["moments"][None], "flip": torch.tensor([False])}
    expected = (item["moments"][0, :32][None] - stats["mean"]) / stats["std"]  # LightningDiT's normalisation
    assert torch.allclose(task.data.latents(batch), expected, atol=1e-5)
    result = train(config, task, cpu, resume=None)
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    weights = ckpt.latest_weights(config.run_dir / "checkpoints")

    config = load_config(None, [*common, "run.task=finetune", "run.name=sit", "model.name=sit_t_1",
                                f"model.init={weights}", "model.affine_norms=true", "model.num_classes=10",
                                "generation.method=transport", "generation.sampler=ode",
                                "generation.ode_method=euler", "generation.sample_steps=2",
                                "generation.grid_per_class=1", "optim.lr=1e-3", "optim.weight_decay=0.0"])
    task = build_task(config)
    assert task.latent_shape == (32, 4, 4) and task.model.x_embedder.proj.weight.shape[1] == 32
    source, _ = load_weights(weights)
    assert torch.equal(task.model.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    result = train(config, task, cpu, resume=None)
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    assert (config.run_dir / "samples" / "step_0000002.png").is_file()  # decoded through the VA-VAE decoder


def test_a_small_vae_folder_may_hold_per_channel_statistics(tmp_path):
    """latent_stats.json of `small-f4` holds one scale/shift (what `usp train-vae` writes) or a list per channel."""
    (tmp_path / "latent_stats.json").write_text(json.dumps({"scale": 0.5, "shift": 0.1}))
    assert scale_and_shift("small-f4", str(tmp_path)) == (0.5, 0.1)
    scale, shift = [1.0 / (c + 1) for c in range(8)], [0.1 * c for c in range(8)]
    (tmp_path / "latent_stats.json").write_text(json.dumps({"scale": scale, "shift": shift}))
    got = scale_and_shift("small-f4", str(tmp_path))
    assert got == (tuple(scale), tuple(shift))
    x = torch.ones(1, 8, 2, 2)
    z = normalise(x, *got)  # channel c: (1 − 0.1c) / (c + 1)
    assert torch.allclose(z[0, :, 0, 0], torch.tensor([(1 - 0.1 * c) / (c + 1) for c in range(8)]))


# ---- 5. Per-channel statistics computed from a cache (usp.latent.stats, LightningDiT's latents_stats.pt) ------------


def test_channel_stats_are_torch_mean_and_unbiased_std_over_n_h_w():
    """With a (clamped) zero posterior variance the sample is the mean: the stats must equal torch's reduction
    over N, H, W of those latents, std unbiased (LightningDiT's `latents.std(dim=[0, 2, 3])`)."""
    from usp.latent.stats import channel_stats

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(12, 3, 4, 4, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 5.0
    moments = torch.cat([mean, torch.full_like(mean, -100.0)], dim=1)  # logvar clamped to −30: std 3e-7
    stats = channel_stats(moments.numpy(), chunk=5)
    torch.testing.assert_close(stats["mean"], mean.mean(dim=[0, 2, 3], keepdim=True), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats["std"], mean.std(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stats["std"], mean.std(dim=[0, 2, 3], keepdim=True, unbiased=False), rtol=1e-4)


def test_channel_stats_use_posterior_samples_and_at_most_max_images():
    from usp.latent.stats import channel_stats

    zeros = torch.zeros(200, 2, 4, 4)
    moments = torch.cat([zeros, zeros], dim=1)  # mean 0, logvar 0: samples ~ N(0, 1)
    stats = channel_stats(moments)
    assert torch.allclose(stats["std"].flatten(), torch.ones(2), atol=0.05)  # a posterior mean would give 0
    # image i holds the value i: a draw of 10 of 30 images has a mean of 10 distinct values, reproducibly
    values = torch.arange(30.0).view(30, 1, 1, 1).expand(30, 1, 2, 2)
    moments = torch.cat([values, torch.full_like(values, -100.0)], dim=1)
    picked = channel_stats(moments, max_images=10)
    assert torch.equal(picked["mean"], channel_stats(moments, max_images=10)["mean"])
    assert picked["mean"].item() != pytest.approx(14.5) and 4.5 <= picked["mean"].item() <= 24.5


def test_cache_latents_computes_the_statistics_when_none_are_published(tiny_vavae, tmp_path):
    """No published latents_stats.pt: the space loads for encoding, the cache builder writes the statistics of the
    unflipped cached latents beside the cache and records their hash; runs then read them from latent.cache, and
    a published file, once there, wins."""
    from usp.latent.stats import PENDING, channel_stats

    path, published = tiny_vavae
    (path.parent / "latents_stats.pt").unlink()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1, "label": i}

    folder = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="run `usp cache-latents`"):
        LatentSpace.load("va-vae-f16d32", str(path))  # no cache to compute them in: refused up front
    latent = LatentSpace.load("va-vae-f16d32", str(path), cache=str(folder))
    assert latent.norm_fingerprint == PENDING
    with pytest.raises(ValueError, match="not computed yet"):
        latent.encode(torch.zeros(1, 3, 64, 64))
    cache = build_cache(Images(), latent, 64, folder, "train", batch_size=2, progress=False)
    stats = torch.load(folder / "latents_stats.pt", weights_only=True)
    moments = torch.from_numpy(np.array(np.memmap(cache, dtype=np.float32, mode="r", offset=4096,
                                                  shape=(5, 2, 64, 4, 4))))
    assert torch.equal(stats["mean"], channel_stats(moments[:, 0])["mean"])  # the plain copies, not the flips
    assert not torch.equal(stats["mean"], channel_stats(moments[:, 1])["mean"])
    assert (stats["split"], stats["images"]) == ("train", 5)
    scale, shift = scale_and_shift("va-vae-f16d32", str(path), str(folder))
    assert torch.allclose(torch.tensor(shift, dtype=torch.float64), stats["mean"].flatten().double())
    assert torch.allclose(torch.tensor(scale, dtype=torch.float64), 1.0 / stats["std"].flatten().double())
    assert read_header(cache)["norm_sha256"] == norm_fingerprint(scale, shift)  # runs on this cache are checked
    torch.save(published, path.parent / "latents_stats.pt")
    assert scale_and_shift("va-vae-f16d32", str(path), str(folder)) == scale_and_shift("va-vae-f16d32", str(path))

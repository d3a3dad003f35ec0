"""LatentSpace precision and layout: bf16 autocast stays close to fp32 and really runs in bf16, channels-last
changes nothing beyond rounding, 'fp32' is exact even inside a caller's autocast, and the recipe switch reaches
the on-the-fly pretraining path."""

from __future__ import annotations

import pytest
import torch

from usp.latent.vae import F4_AUTOENCODER_CONFIG, LatentSpace


def _space(**kwargs) -> LatentSpace:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return LatentSpace("small-f4", AutoencoderKL(**F4_AUTOENCODER_CONFIG), 1.0, **kwargs)


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_bf16_encode_is_close_to_fp32_and_runs_in_bf16():
    exact, fast = _space(precision="fp32"), _space(precision="bf16")
    seen: list[torch.dtype] = []
    fast.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref, got = exact.moments(_images()), fast.moments(_images())
    assert seen == [torch.bfloat16] and got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.004); a few layers of rounding stay within a few steps
    assert 0 < err < 0.05 * ref.abs().max().item()
    decoded = fast.decode(got[:, :8])
    assert decoded.dtype == torch.float32 and torch.allclose(decoded, exact.decode(got[:, :8]), atol=0.1)


def test_channels_last_changes_nothing_but_rounding():
    ref = _space().moments(_images())
    torch.testing.assert_close(_space(channels_last=True).moments(_images()), ref, rtol=1e-4, atol=1e-5)


def test_fp32_is_exact_inside_a_callers_autocast():
    space = _space(precision="fp32")
    ref = space.moments(_images())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = space.moments(_images())
        inherited = _space().moments(_images())  # precision None: the caller's bf16 applies
    torch.testing.assert_close(inside, ref, rtol=0, atol=0)
    assert not torch.equal(inherited, ref)


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        _space(precision="fp8")


def test_recipe_switch_reaches_the_on_the_fly_path(fmnist_overrides):
    from usp.config import load_config
    from usp.latent.data import LatentData

    data = LatentData(load_config(None, [*fmnist_overrides, "latent.vae_precision=bf16",
                                         "latent.vae_channels_last=true"]), "train", augment=False)
    assert data.vae.precision == "bf16" and data.vae.channels_last
    exact = LatentData(load_config(None, fmnist_overrides), "train", augment=False)
    assert exact.vae.precision == "fp32"  # the paper recipes: exact fp32 encodes
    batch = {"image": torch.stack([exact.dataset[i]["image"] for i in range(4)])}
    fast, ref = data.latents(batch), exact.latents(batch)
    assert 0 < (fast - ref).abs().max() < 0.05 * ref.abs().max()

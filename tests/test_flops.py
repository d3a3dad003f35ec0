"""usp.train.flops: the analytic FLOP count equals a hand count and torch's own FLOP counter; MFU and the peak table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from usp.models.dit import DiT
from usp.models.mae import MaskedLatentAutoencoder
from usp.train.flops import mfu, peak_for_name, training_flops_per_sample


def tiny_mae() -> MaskedLatentAutoencoder:
    # 4×4×1 latents, patch 2 -> L = 4 tokens; width 8 everywhere, one block each side.
    return MaskedLatentAutoencoder(latent_size=4, in_channels=1, patch_size=2, embed_dim=8, depth=1, num_heads=2,
                                   decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def tiny_dit() -> DiT:
    return DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=2, num_classes=3)


def test_mae_flops_match_a_hand_count():
    # D = 8, MLP 32: a block's matmul weights are qkv 8·24 + proj 8·8 + fc1 8·32 + fc2 32·8 = 768.
    # mask 0.5 of L = 4: the encoder sees cls + 2 tokens (T = 3), the decoder cls + 4 (T = 5).
    patch_embed = 2 * (1 * 2 * 2 * 8) * 4
    encoder = 2 * 768 * 3 + 4 * 3**2 * 8
    decoder = 2 * (8 * 8) * 3 + 2 * 768 * 5 + 4 * 5**2 * 8 + 2 * (8 * 4) * 5
    assert training_flops_per_sample(tiny_mae(), mask_ratio=0.5) == 3 * (patch_embed + encoder + decoder) == 43_008


def test_dit_flops_match_a_hand_count():
    x_embed = 2 * (1 * 2 * 2 * 8) * 4
    t_mlp = 2 * (256 * 8 + 8 * 8)  # 256 sinusoidal features -> 8 -> 8, on one vector
    block = 2 * 768 * 4 + 4 * 4**2 * 8 + 2 * (8 * 6 * 8)  # token linears, attention, adaLN on c
    final = 2 * (8 * 2 * 2 * 2) * 4 + 2 * (8 * 2 * 8)
    assert training_flops_per_sample(tiny_dit()) == 3 * (x_embed + t_mlp + block + final) == 38_016


@pytest.mark.parametrize("name", ["vit_t_2", "vit_s_2", "dit_t_2", "sit_t_2"])
def test_forward_count_equals_torchs_flop_counter(name):
    """torch's FlopCounterMode counts every matmul and convolution the forward runs (attention through the math
    kernel, which it sees as two batched matmuls; it does not count the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from usp.models import create_model

    model = create_model(name, latent_size=32) if name.startswith("vit") else create_model(name, input_size=32)
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if name.startswith("vit"):
            model(x, 0.75)
        else:
            model(x, torch.tensor([3, 700]), torch.tensor([1, 2]))
    assert counter.get_total_flops() == pytest.approx(2 * training_flops_per_sample(model) / 3, rel=1e-12)


def test_peak_table_and_mfu():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert peak_for_name("NVIDIA GeForce RTX 4090", "bf16") is None
    assert mfu(100.0, 1e12, 400e12) == pytest.approx(0.25)
    assert mfu(100.0, 1e12, None) is None

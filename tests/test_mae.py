"""The pretraining model: masking, the loss, the key layout of official checkpoints, overfitting."""

from __future__ import annotations

import pytest
import torch

from usp.models import create_model
from usp.models.mae import MaskedLatentAutoencoder, normalized_patch_targets, random_masking
from usp.models.vit import patchify, sincos_2d, unpatchify


def tiny(**kw) -> MaskedLatentAutoencoder:
    args = dict(latent_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2, num_heads=4,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    return MaskedLatentAutoencoder(**{**args, **kw})


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_l_times_one_minus_ratio(mask_ratio):
    x = torch.randn(3, 16, 5)
    visible, mask, ids_restore = random_masking(x, mask_ratio)
    keep = int(16 * (1 - mask_ratio))
    assert visible.shape == (3, keep, 5)
    assert torch.equal(mask.sum(1), torch.full((3,), 16.0 - keep))
    # The kept tokens are exactly the unmasked positions, in shuffled order.
    for n in range(3):
        kept_rows = {tuple(r.tolist()) for r in visible[n]}
        expected = {tuple(x[n, i].tolist()) for i in range(16) if mask[n, i] == 0}
        assert kept_rows == expected


def test_restore_indices_invert_the_shuffle():
    noise = torch.rand(4, 10)
    ids_shuffle = torch.argsort(noise, dim=1)
    _, _, ids_restore = random_masking(torch.zeros(4, 10, 1), 0.5, noise)
    x = torch.arange(10.0).expand(4, -1)
    shuffled = torch.gather(x, 1, ids_shuffle)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), x)


def test_mask_is_reproducible_from_noise():
    x = torch.randn(2, 16, 3)
    noise = torch.rand(2, 16)
    a, mask_a, _ = random_masking(x, 0.75, noise)
    b, mask_b, _ = random_masking(x, 0.75, noise.clone())
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    # The smallest-noise tokens are the kept ones (MAE's convention).
    assert torch.equal(mask_a == 0, noise <= noise.sort(1).values[:, 3:4])


def test_norm_pix_target_matches_hand_computation():
    patch = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean = 3.0
    var = ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased: 14/3
    expected = (patch - mean) / (var + 1e-6) ** 0.5
    assert torch.allclose(normalized_patch_targets(patch), expected)


def test_loss_counts_masked_tokens_only_and_matches_hand_computation():
    torch.manual_seed(0)
    model = tiny(norm_pix_loss=False)
    x = torch.randn(2, 4, 8, 8)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(x, 0.75, noise=noise)
    target = patchify(x, 2)  # (2, 16, 16)
    hand = 0.0
    for n in range(2):
        for i in range(16):
            if mask[n, i] == 1:
                hand += ((pred[n, i] - target[n, i]) ** 2).mean().item()
    hand /= mask.sum().item()
    assert abs(loss.item() - hand) < 1e-5
    # Changing the prediction on a visible token leaves the loss unchanged.
    visible = (mask[0] == 0).nonzero()[0, 0]
    pred2 = pred.detach().clone()
    pred2[0, visible] += 100.0
    assert torch.allclose(model.loss(x, pred2, mask), loss.detach())


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(x, 2)
    # First patch = top-left 2×2 of every channel, ordered (row, col, channel).
    expected = torch.stack([x[0, :, r, c] for r in range(2) for c in range(2)]).reshape(-1)
    assert torch.equal(patches[0, 0], expected)
    assert torch.equal(unpatchify(patches, 2, 3), x)


def test_sincos_matches_mae_formula():
    table = sincos_2d(8, 3, cls_token=True)
    assert torch.equal(table[0], torch.zeros(8))
    # Token for (row=1, col=2): first half encodes the column, second half the row; each [sin | cos].
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    col, row = 2.0, 1.0
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)])
    assert torch.allclose(table[1 + 1 * 3 + 2].double(), expected, atol=1e-6)


def test_vit_b_2_has_the_official_key_set_and_shapes():
    model = create_model("vit_b_2", latent_size=32, in_channels=4)
    state = model.state_dict()
    L, D, Dd = 256, 768, 512
    expected = {
        "cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, 4, 2, 2),
        "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
        "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
        "decoder_pos_embed": (1, L + 1, Dd), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
        "decoder_pred.weight": (2 * 2 * 4, Dd), "decoder_pred.bias": (16,),
    }
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
             "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D),
             "mlp.fc2.bias": (D,)}
    for i in range(12):
        expected.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    for i in range(8):
        expected.update({f"decoder_blocks.{i}.{k}": tuple(Dd if d == D else 4 * Dd if d == 4 * D else 3 * Dd
                                                          if d == 3 * D else d for d in s)
                         for k, s in block.items()})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # pos_embed is the fixed sin-cos table, cls slot zero, not trained.
    assert torch.equal(model.pos_embed[0], sincos_2d(D, 16, cls_token=True))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # An "official" state dict of the same layout loads strictly.
    model.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()}, strict=True)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(8, 4, 8, 8)
    noise = torch.rand(8, 16)  # the same mask every step: a fixed batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss, _, _ = model(x, 0.75, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_wrong_latent_size_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="latents of size"):
        model(torch.randn(1, 4, 16, 16))

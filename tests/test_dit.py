"""DiT/SiT backbone: embedders against hand computation, adaLN-Zero, CFG algebra, public key layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from usp.models import create_model, list_models
from usp.models.dit import DiT, DiTBlock, LabelEmbedder, TimestepEmbedder
from usp.models.vit import sincos_2d

# Written out from DiT Table 1 (and our tiny size), not read from the module under test.
EXPECTED_SIZES = {"t": (128, 4, 2), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}


TEST_SIZE = dict(hidden_size=192, depth=4, num_heads=3)  # fixed here, whatever the registry's "t" becomes


def tiny(**overrides) -> DiT:
    return create_model("dit_t_2", input_size=8, num_classes=10, **{**TEST_SIZE, **overrides})


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every trainable tensor (zeroed adaLN and output layers too) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def public_layout(depth: int, dim: int, patch: int, c_in: int, c_out: int, tokens: int, classes: int,
                  affine_norms: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a public DiT/SiT checkpoint (facebookresearch/DiT `DiT_models`), written by hand."""
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, dim),
        "x_embedder.proj.weight": (dim, c_in, patch, patch),
        "x_embedder.proj.bias": (dim,),
        "t_embedder.mlp.0.weight": (dim, 256),
        "t_embedder.mlp.0.bias": (dim,),
        "t_embedder.mlp.2.weight": (dim, dim),
        "t_embedder.mlp.2.bias": (dim,),
        "y_embedder.embedding_table.weight": (classes + 1, dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        if affine_norms:
            shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,)})
            shapes.update({b + "norm2.weight": (dim,), b + "norm2.bias": (dim,)})
        shapes.update({
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
            b + "adaLN_modulation.1.weight": (6 * dim, dim), b + "adaLN_modulation.1.bias": (6 * dim,),
        })
    shapes.update({
        "final_layer.linear.weight": (patch * patch * c_out, dim),
        "final_layer.linear.bias": (patch * patch * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, dim),
        "final_layer.adaLN_modulation.1.bias": (2 * dim,),
    })
    return shapes


def layout_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


def test_timestep_embedding_matches_hand_computation():
    ts = [0.0, 1.0, 7.5, 999.0]
    emb = TimestepEmbedder.timestep_embedding(torch.tensor(ts), 256)
    assert emb.shape == (4, 256)
    for row, t in enumerate(ts):
        for k in (0, 1, 17, 64, 127):
            freq = 10000 ** (-k / 128)  # f_k = max_period^(-k/half)
            assert emb[row, k].item() == pytest.approx(math.cos(t * freq), abs=2e-4)  # cos half first
            assert emb[row, 128 + k].item() == pytest.approx(math.sin(t * freq), abs=2e-4)
    odd = TimestepEmbedder.timestep_embedding(torch.tensor([3.0]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0  # odd width: one zero column appended
    # Integer DDPM indices embed exactly like the same floats.
    assert torch.equal(TimestepEmbedder.timestep_embedding(torch.tensor([5, 9]), 256),
                       TimestepEmbedder.timestep_embedding(torch.tensor([5.0, 9.0]), 256))


def test_label_embedder_null_row_and_dropout():
    emb = LabelEmbedder(num_classes=5, hidden_size=8, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == 6  # extra null row
    labels = torch.tensor([0, 3, 4])
    table = emb.embedding_table.weight
    out = emb(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(out, table[[5, 3, 5]])
    assert torch.equal(emb(labels, train=False), table[[0, 3, 4]])  # no dropout at eval
    always = LabelEmbedder(num_classes=5, hidden_size=8, dropout_prob=1.0)
    assert torch.equal(always(labels, train=True), always.embedding_table.weight[[5, 5, 5]])
    no_cfg = LabelEmbedder(num_classes=5, hidden_size=8, dropout_prob=0.0)
    assert no_cfg.embedding_table.num_embeddings == 5
    with pytest.raises(ValueError, match="no null label"):
        no_cfg(labels, train=False, force_drop_ids=torch.tensor([1, 0, 0]))


# --------------------------------------------------------------------------------------------
# Blocks and model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [False, True])
def test_block_with_zero_adaln_is_identity(affine):
    torch.manual_seed(0)
    block = DiTBlock(64, 4, affine_norm=affine)  # attn/mlp keep their non-zero default init
    torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    x, c = torch.randn(2, 5, 64), torch.randn(2, 64)
    assert torch.equal(block(x, c), x)  # adaLN-Zero: gates are 0, so x + 0·branch is exactly x


def test_block_matches_written_out_adaln_formula():
    """Chunk order (shift, scale, gate) x (msa, mlp) is what public checkpoints were trained with."""
    torch.manual_seed(0)
    d = 32
    block = DiTBlock(d, 4, affine_norm=True)
    randomise_(block)
    x, c = torch.randn(2, 6, d), torch.randn(2, d)
    w, b = block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias
    mod = F.silu(c) @ w.T + b  # (N, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, j * d:(j + 1) * d, None].transpose(1, 2) for j in range(6))
    h = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, 1e-6) * (1 + scale1) + shift1
    x1 = x + gate1 * block.attn(h)
    h = F.layer_norm(x1, (d,), block.norm2.weight, block.norm2.bias, 1e-6) * (1 + scale2) + shift2
    h = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias, approximate="tanh")  # DiT's tanh GELU
    expected = x1 + gate2 * (h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    torch.testing.assert_close(block(x, c), expected, atol=1e-5, rtol=1e-5)


def test_fresh_model_predicts_zero_and_pos_embed_is_fixed_sincos():
    model = tiny().eval()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2]))
    assert out.shape == (2, 8, 8, 8) and torch.equal(out, torch.zeros_like(out))  # zeroed final layer
    assert torch.equal(model.pos_embed[0], sincos_2d(192, 4))
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_forward_backward_every_tiny_variant_is_finite():
    for name in [n for n in list_models() if n.startswith(("dit", "sit")) and "_t_" in n]:
        torch.manual_seed(0)
        model = create_model(name, input_size=8, num_classes=10)
        randomise_(model)
        x = torch.randn(2, 4, 8, 8)
        out = model(x, torch.rand(2), torch.tensor([0, 9]))
        assert out.shape == (2, model.num_output_channels, 8, 8), name
        out.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_sit_forward_is_the_first_half_of_dit_forward():
    torch.manual_seed(0)
    dit = tiny().eval()
    randomise_(dit)
    sit = create_model("sit_t_2", input_size=8, num_classes=10, **TEST_SIZE).eval()
    sit.load_state_dict(dit.state_dict(), strict=True)  # same checkpoint layout
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    full, sit_out = dit(x, t, y), sit(x, t, y)
    assert full.shape[1] == 8 and sit_out.shape[1] == 4
    assert torch.equal(sit_out, full[:, :4])


def test_wrong_input_size_is_an_error():
    with pytest.raises(ValueError, match="built for 8x8"):
        tiny()(torch.randn(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


def _cfg_setup():
    torch.manual_seed(0)
    model = tiny().eval()
    randomise_(model)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10.0, 200.0, 999.0])
    y = torch.tensor([1, 4, 7])
    null = torch.full_like(y, model.null_label)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
    batch = (torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null]))  # 2nd-half x unused
    return model, batch, cond, uncond


def test_cfg_scale_one_is_the_conditional_output():
    model, (x, t, y), cond, uncond = _cfg_setup()
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=1.0, guided_channels=None)
    torch.testing.assert_close(out[:3], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:], cond, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guided", [3, None])
def test_cfg_guides_only_the_requested_channels(guided):
    model, (x, t, y), cond, uncond = _cfg_setup()
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=scale, guided_channels=guided)
    g = 8 if guided is None else guided
    mixed = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    assert (mixed - cond[:, :g]).abs().max() > 0.1  # guidance actually changes something
    torch.testing.assert_close(out[:3, :g], mixed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[3:, :g], mixed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:3, g:], cond[:, g:], atol=1e-5, rtol=1e-5)  # unguided: each half's own
    torch.testing.assert_close(out[3:, g:], uncond[:, g:], atol=1e-5, rtol=1e-5)


def test_cfg_rejects_odd_batch():
    model = tiny()
    with pytest.raises(ValueError, match="odd size 3"):
        model.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.5)


# --------------------------------------------------------------------------------------------
# Key layout and registry
# --------------------------------------------------------------------------------------------


def test_dit_xl_2_has_the_public_checkpoint_layout():
    with torch.device("meta"):  # 675M parameters: shapes only, no memory
        model = create_model("dit_xl_2", input_size=32)
    assert layout_of(model) == public_layout(28, 1152, 2, 4, 8, 256, 1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # the paper's "675M" for DiT-XL/2


def test_public_layout_state_dict_loads_strictly():
    shapes = public_layout(4, 192, 2, 4, 8, 16, 10)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    model = tiny()
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.blocks[3].adaLN_modulation[1].weight, state["blocks.3.adaLN_modulation.1.weight"])


def test_usp_vae_simple_layout_adds_affine_block_norms():
    with torch.device("meta"):
        model = create_model("dit_b_2", input_size=32, affine_norms=True)
    assert layout_of(model) == public_layout(12, 768, 2, 4, 8, 256, 1000, affine_norms=True)
    assert model.blocks[0].norm1.eps == 1e-6 and model.final_layer.norm_final.weight is None


@pytest.mark.parametrize("name", list_models("dit") + list_models("sit"))
def test_registry_variant_sizes(name):
    family, size, patch = name.split("_")
    with torch.device("meta"):
        model = create_model(name, input_size=32)
    width, depth, heads = EXPECTED_SIZES[size]
    assert (model.hidden_size, model.depth, model.blocks[0].attn.num_heads) == (width, depth, heads)
    assert model.patch_size == int(patch) and model.out_channels == 8
    assert model.num_output_channels == (8 if family == "dit" else 4)
    assert layout_of(model) == public_layout(depth, width, int(patch), 4, 8, (32 // int(patch)) ** 2, 1000)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(ValueError, match="dit_xl_2.*sit_s_8"):
        create_model("DiT-XL/2")


@pytest.mark.parametrize("affine", [False, True], ids=["public-dit-xl-2", "usp-vae-simple-dit-xl-2"])
def test_xl_2_checkpoint_layouts_load_strictly(affine):
    """A state dict with the public DiT-XL/2 (or USP VAE-simple) keys and shapes loads with strict=True.

    Tensors live on the meta device, so strict key/shape checking runs without 2.7 GB of weights."""
    shapes = public_layout(28, 1152, 2, 4, 8, 256, 1000, affine_norms=affine)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = create_model("dit_xl_2", input_size=32, affine_norms=affine)
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    wrong = dict(state)
    wrong["blocks.0.attn.qkv.weight"] = torch.empty(3 * 1152, 1024, device="meta")
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        model.load_state_dict(wrong, strict=True, assign=True)

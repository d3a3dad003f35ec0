"""LightningDiT: RoPE by hand, RMSNorm and SwiGLU by their formulas, the official checkpoint layout, and the
all-options-off network equal to SiT's (an independent reference for everything the options do not touch)."""

from __future__ import annotations

import math

import pytest
import torch

from usp.models import create_model
from usp.models.lightningdit import RMSNorm, SwiGLU, apply_rope, rope_tables


def tiny(**overrides) -> torch.nn.Module:
    kwargs = dict(input_size=4, in_channels=6, depth=2, num_classes=10)
    return create_model("lightningdit_t_1", **{**kwargs, **overrides})


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def test_rope_on_a_2x2_grid_by_hand():
    """head_dim 4: one frequency (ω = 1) per half; the first pair turns by the row, the second by the column."""
    cos, sin = rope_tables(4, 2)
    c1, s1 = math.cos(1.0), math.sin(1.0)
    # tokens row-major: (r, c) = (0, 0), (0, 1), (1, 0), (1, 1); angles [r, r, c, c]
    want_cos = torch.tensor([[1, 1, 1, 1], [1, 1, c1, c1], [c1, c1, 1, 1], [c1, c1, c1, c1]])
    want_sin = torch.tensor([[0, 0, 0, 0], [0, 0, s1, s1], [s1, s1, 0, 0], [s1, s1, s1, s1]])
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-7)

    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 4, 4)  # (N, heads, L, head_dim), the same q everywhere
    out = apply_rope(q, cos, sin)[0, 0]  # (L, 4)
    rot = lambda a, b, angle: [a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)]  # noqa: E731
    want = torch.tensor([rot(1, 2, r) + rot(3, 4, c) for r in (0, 1) for c in (0, 1)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_rope_frequencies_of_a_wider_head_by_hand():
    """head_dim 8: per half the frequencies 1 and 10000^(-2/4) = 1/100, each on an adjacent pair."""
    cos, _ = rope_tables(8, 3)
    r, c = 2, 1  # token 2·3 + 1 = 7
    angles = torch.tensor([r, r, r / 100, r / 100, c, c, c / 100, c / 100], dtype=torch.float64)
    torch.testing.assert_close(cos[7].double(), angles.cos(), rtol=0, atol=1e-6)


def test_rope_scores_depend_only_on_the_offset():
    """⟨R(p)q, R(p')k⟩ = ⟨R(p+δ)q, R(p'+δ)k⟩: the invariant RoPE exists for, on rows and on columns."""
    torch.manual_seed(0)
    grid, head_dim = 5, 16
    cos, sin = rope_tables(head_dim, grid)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(p, p2):
        i, j = p[0] * grid + p[1], p2[0] * grid + p2[1]
        rq = apply_rope(q.view(1, 1, 1, -1), cos[i : i + 1], sin[i : i + 1]).flatten()
        rk = apply_rope(k.view(1, 1, 1, -1), cos[j : j + 1], sin[j : j + 1]).flatten()
        return torch.dot(rq, rk)

    torch.testing.assert_close(score((0, 1), (2, 3)), score((2, 2), (4, 4)), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(score((0, 1), (2, 3)), score((0, 1), (3, 2)))  # rows and columns are told apart


# --------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU
# --------------------------------------------------------------------------------------------


def test_rmsnorm_and_swiglu_by_their_formulas():
    norm = RMSNorm(3)
    norm.weight.data = torch.tensor([1.0, 2.0, 0.5])
    x = torch.tensor([[3.0, -4.0, 0.0]])
    rms = math.sqrt((9 + 16) / 3 + 1e-6)
    torch.testing.assert_close(norm(x), torch.tensor([[3 / rms, -8 / rms, 0.0]]))

    ffn = SwiGLU(2, 1)
    with torch.no_grad():
        ffn.w12.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # a = x0, b = x1
        ffn.w12.bias.zero_()
        ffn.w3.weight.fill_(2.0)
        ffn.w3.bias.fill_(0.5)
    x = torch.tensor([[1.5, -2.0]])
    silu = 1.5 / (1 + math.exp(-1.5))
    torch.testing.assert_close(ffn(x), torch.full((1, 2), 2 * silu * -2.0 + 0.5))


# --------------------------------------------------------------------------------------------
# Official layout
# --------------------------------------------------------------------------------------------


def official_layout(depth: int, width: int, heads: int, patch: int, channels: int, grid: int, classes: int,
                    swiglu=True, rope=True, rmsnorm=True, qknorm=False, wo_shift=False) -> dict[str, tuple]:
    """Keys and shapes of hustvl/LightningDiT models/lightningdit.py's state dict, written out from its modules."""
    head = width // heads
    hidden = int(2 / 3 * 4 * width)
    shapes: dict[str, tuple] = {
        "pos_embed": (1, grid * grid, width),
        "x_embedder.proj.weight": (width, channels, patch, patch), "x_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (classes + 1, width),
        "final_layer.linear.weight": (patch * patch * channels, width),
        "final_layer.linear.bias": (patch * patch * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    if rope:
        shapes |= {"feat_rope.freqs_cos": (grid * grid, head), "feat_rope.freqs_sin": (grid * grid, head)}
    if rmsnorm:
        shapes["final_layer.norm_final.weight"] = (width,)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                   b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                   b + "adaLN_modulation.1.weight": ((4 if wo_shift else 6) * width, width),
                   b + "adaLN_modulation.1.bias": ((4 if wo_shift else 6) * width,)}
        if rmsnorm:
            shapes |= {b + "norm1.weight": (width,), b + "norm2.weight": (width,)}
        if qknorm:
            for qk in ("q_norm", "k_norm"):
                shapes |= {b + f"attn.{qk}.weight": (head,)} | ({} if rmsnorm else {b + f"attn.{qk}.bias": (head,)})
        if swiglu:
            shapes |= {b + "mlp.w12.weight": (2 * hidden, width), b + "mlp.w12.bias": (2 * hidden,),
                       b + "mlp.w3.weight": (width, hidden), b + "mlp.w3.bias": (width,)}
        else:
            shapes |= {b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                       b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,)}
    return shapes


def test_lightningdit_xl_1_official_layout_loads_strictly():
    """The released 64/800-epoch VA-VAE LightningDiT-XL/1 (SwiGLU, RoPE, RMSNorm; 16x16x32 latents), on meta tensors."""
    shapes = official_layout(28, 1152, 16, 1, 32, 16, 1000)
    assert len(shapes) == 351
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with torch.device("meta"):
        model = create_model("lightningdit_xl_1", input_size=16, in_channels=32)
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    params = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("feat_rope"))  # the rest are buffers
    assert params == sum(p.numel() for p in model.parameters()) and round(params / 1e6) == 675  # the paper's 675M
    wrong = dict(state)
    wrong["blocks.3.mlp.w3.weight"] = torch.empty(1152, 4608, device="meta")  # a GELU-sized hidden layer
    with pytest.raises(RuntimeError, match="blocks.3.mlp.w3.weight"):
        model.load_state_dict(wrong, strict=True, assign=True)


@pytest.mark.parametrize("options", [dict(qknorm=True), dict(qknorm=True, rmsnorm=False), dict(wo_shift=True),
                                     dict(swiglu=False, rope=False)], ids=str)
def test_official_option_layouts_load_strictly(options):
    names = dict(swiglu="use_swiglu", rope="use_rope", rmsnorm="use_rmsnorm", qknorm="use_qknorm", wo_shift="wo_shift")
    shapes = official_layout(2, 128, 2, 2, 4, 4, 10, **options)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    model = create_model("lightningdit_t_2", input_size=8, in_channels=4, depth=2, num_classes=10,
                         **{names[k]: v for k, v in options.items()})
    result = model.load_state_dict(state, strict=True)  # a missing or unexpected key raises, naming it
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # every official tensor landed under its name


def test_the_rope_table_of_a_checkpoint_equals_the_built_one():
    """The stored `feat_rope` buffers are fixed: a model's own table is the one rope_tables computes."""
    model = tiny()
    cos, sin = rope_tables(64, 4)
    assert torch.equal(model.feat_rope.freqs_cos, cos) and torch.equal(model.feat_rope.freqs_sin, sin)


# --------------------------------------------------------------------------------------------
# Against SiT
# --------------------------------------------------------------------------------------------


def test_with_every_option_off_it_is_sit():
    """No SwiGLU, RoPE, RMSNorm, qk-norm or shift removal: the DiT block, so SiT's weights give SiT's output."""
    torch.manual_seed(0)
    sit = create_model("sit_t_1", input_size=4, in_channels=6, depth=2, num_classes=10, learn_sigma=False)
    with torch.no_grad():
        for name, p in sit.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)  # past the zero init, so every layer counts
    light = tiny(use_swiglu=False, use_rope=False, use_rmsnorm=False)
    light.load_state_dict(sit.state_dict(), strict=True)
    x, t, y = torch.randn(3, 6, 4, 4), torch.rand(3), torch.tensor([0, 4, 10])
    torch.testing.assert_close(light.eval()(x, t, y), sit.eval()(x, t, y), rtol=0, atol=0)
    # and RoPE on changes the output (the tables reach the blocks)
    light_rope = tiny(use_swiglu=False, use_rmsnorm=False)
    light_rope.load_state_dict({**sit.state_dict(), **{f"feat_rope.{k}": v for k, v in
                                                       light_rope.feat_rope.state_dict().items()}}, strict=True)
    assert (light_rope.eval()(x, t, y) - sit(x, t, y)).abs().max() > 1e-4


def test_guided_channels_at_or_past_k_are_the_conditional_output():
    """forward_with_cfg guides channels < k; channels ≥ k of both halves are what the conditional half computed."""
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)  # a non-zero output
        for block in model.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.1)
    x, t = torch.randn(2, 6, 4, 4), torch.full((4,), 0.3)
    y = torch.tensor([1, 2, 10, 10])
    out = model.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=4.0, guided_channels=3)
    cond, uncond = model(x, t[:2], y[:2]), model(x, t[:2], y[2:])
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2:, 3:], uncond[:, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-5, atol=1e-5)
    assert (out[:2, :3] - cond[:, :3]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# USP pretraining in LightningDiT's shape, and its transfer
# --------------------------------------------------------------------------------------------


def tiny_encoder(**overrides) -> torch.nn.Module:
    kwargs = dict(latent_size=4, in_channels=6, depth=2, decoder_depth=1)
    return create_model("vit_t_1_lightning", **{**kwargs, **overrides})


def test_masked_rope_follows_the_kept_tokens_grid_positions():
    """Keep the same 4 of 16 tokens in two different sequence orders: each kept token's encoding must be the same,
    because its rotation is its grid position's, not its place in the shuffled sequence. The cls row turns by 0."""
    torch.manual_seed(0)
    model = tiny_encoder().eval()
    x = torch.randn(1, 6, 4, 4)
    kept = [5, 0, 14, 9]  # grid positions; small noise = kept (random_masking sorts the noise)
    noise_a, noise_b = torch.rand(1, 16) + 1, torch.rand(1, 16) + 1
    for rank, pos in enumerate(kept):
        noise_a[0, pos], noise_b[0, pos] = rank / 10, (3 - rank) / 10  # the same set, reversed order
    out_a, mask_a, restore_a = model.forward_encoder(x, 0.75, noise_a)
    out_b, mask_b, restore_b = model.forward_encoder(x, 0.75, noise_b)
    assert torch.equal(mask_a, mask_b) and sorted(torch.nonzero(mask_a[0] == 0).flatten().tolist()) == sorted(kept)
    torch.testing.assert_close(out_a[0, 1:], out_b[0, 1:].flip(0), rtol=1e-5, atol=1e-6)  # per token, same encoding
    torch.testing.assert_close(out_a[0, 0], out_b[0, 0], rtol=1e-5, atol=1e-6)  # cls sees the same set

    cos, sin = model.kept_rope(restore_a, 4)  # (1, 1+4, head_dim)
    table_cos, table_sin = rope_tables(64, 4)
    assert torch.equal(cos[0, 1:], table_cos[kept]) and torch.equal(sin[0, 1:], table_sin[kept])
    assert torch.equal(cos[0, 0], torch.ones(64)) and torch.equal(sin[0, 0], torch.zeros(64))


def test_masked_rope_differs_from_sequence_order_rope():
    """The check above has teeth: rotating by the sequence index instead of the grid position changes the output."""
    torch.manual_seed(0)
    model = tiny_encoder().eval()
    x, noise = torch.randn(1, 6, 4, 4), torch.rand(1, 16)
    out, _, restore = model.forward_encoder(x, 0.75, noise)
    by_position = model.kept_rope
    model.kept_rope = lambda ids, n: tuple(torch.cat([t[:1], t[1 : n + 1]])[None] for t in model.rope.tables())
    wrong, _, _ = model.forward_encoder(x, 0.75, noise)
    model.kept_rope = by_position
    assert (out - wrong).abs().max() > 1e-3


def test_lightning_encoder_transfers_every_block_parameter_into_lightningdit():
    """vit_*_lightning -> lightningdit_*: blocks (RMSNorm weights, SwiGLU, qkv, proj), patch embedding and position
    table load; the RoPE tables are the target's own (a function of its grid); the decoder is ignored."""
    from usp.models.transfer import transfer_weights

    torch.manual_seed(0)
    source = tiny_encoder(latent_size=4).state_dict()
    target = tiny()
    report = transfer_weights(source, target)
    state = target.state_dict()
    for key in ("blocks.1.norm1.weight", "blocks.1.mlp.w12.weight", "blocks.0.mlp.w3.bias", "x_embedder.proj.weight"):
        source_key = key.replace("x_embedder", "patch_embed")
        assert key in report.loaded and torch.equal(state[key], source[source_key])
    assert {"feat_rope.freqs_cos", "feat_rope.freqs_sin"} <= set(report.newly_initialised)
    assert {"rope.freqs_cos", "norm.weight", "cls_token", "mask_token"} <= set(report.ignored)
    assert not [k for k in report.newly_initialised if k.startswith("blocks.") and "adaLN" not in k]


def test_a_plain_vit_encoder_into_lightningdit_names_the_missing_key():
    from usp.models.transfer import transfer_weights

    source = create_model("vit_t_1", latent_size=4, in_channels=6, depth=2, decoder_depth=1).state_dict()
    with pytest.raises(ValueError, match=r"no 'blocks.0.mlp.w12.weight'.*vit_\*_lightning encoder"):
        transfer_weights(source, tiny())


def test_flop_count_of_swiglu_matches_the_gelu_mlp_it_replaces():
    """SwiGLU's hidden int(2/3·4D) keeps the 8·D² weights of the 4·D GELU MLP: LightningDiT-XL/1 and SiT-XL/1 count
    the same FLOPs to 0.1 % (the rest of the block is the same)."""
    from usp.train.flops import training_flops_per_sample

    with torch.device("meta"):
        light = create_model("lightningdit_xl_1", input_size=16, in_channels=32)
        sit = create_model("sit_xl_1", input_size=16, in_channels=32, learn_sigma=False)
    assert training_flops_per_sample(light) == pytest.approx(training_flops_per_sample(sit), rel=1e-3)

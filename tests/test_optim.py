"""Values of the optimisation pieces: LARS against hand maths, layer decay, weight-decay groups, lr schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from usp.models.vit import VisionTransformer
from usp.train.optim import LARS, apply_lr, build_optimizer, layer_id, lr_at, param_groups


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(
        latent_size=8, in_channels=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kwargs
    )


def names_of(groups: list[dict]) -> list[str]:
    return [n for g in groups for n in g["param_names"]]


# --------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------


def lars_by_hand(p: list[float], grads: list[list[float]], *, lr, wd, momentum, eta, is_weight) -> list[float]:
    """Plain-Python LARS on a flat list of numbers, one entry of `grads` per step."""
    p, mu = list(p), [0.0] * len(p)
    for g in grads:
        if is_weight:
            u = [gi + wd * pi for gi, pi in zip(g, p)]
            p_norm = math.sqrt(sum(x * x for x in p))
            u_norm = math.sqrt(sum(x * x for x in u))
            trust = eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
            u = [x * trust for x in u]
        else:
            u = list(g)
        mu = [momentum * m + x for m, x in zip(mu, u)]
        p = [pi - lr * m for pi, m in zip(p, mu)]
    return p


def run_lars(p0: torch.Tensor, grads: list[torch.Tensor], **hp) -> torch.Tensor:
    param = nn.Parameter(p0.clone())
    opt = LARS([param], lr=hp["lr"], weight_decay=hp["wd"], momentum=hp["momentum"], trust_coefficient=hp["eta"])
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return param.detach()


HP = dict(lr=0.5, wd=0.05, momentum=0.9, eta=0.001)


def test_lars_weight_two_steps_match_hand_formula():
    p0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    grads = [
        torch.tensor([[0.3, 0.1], [-0.2, 0.4]], dtype=torch.float64),
        torch.tensor([[-0.1, 0.2], [0.05, -0.3]], dtype=torch.float64),
    ]
    got = run_lars(p0, grads, **HP)
    want = lars_by_hand(p0.flatten().tolist(), [g.flatten().tolist() for g in grads], is_weight=True, **HP)
    torch.testing.assert_close(got.flatten(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    # Step 1 spelled out: u = g + wd·p, scaled to η‖p‖/‖u‖; p1 = p0 − lr·u (μ₁ = u₁).
    u = grads[0] + 0.05 * p0
    p1 = p0 - 0.5 * (0.001 * p0.norm() / u.norm()) * u
    torch.testing.assert_close(run_lars(p0, grads[:1], **HP), p1, rtol=0, atol=1e-15)


def test_lars_bias_has_no_decay_and_no_trust_ratio():
    b0 = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64)
    grads = [torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64), torch.tensor([0.4, -0.1, 0.0], dtype=torch.float64)]
    got = run_lars(b0, grads, **HP)
    # Plain heavy-ball SGD: μ₂ = 0.9·g₁ + g₂, p₂ = p₀ − lr·(g₁ + μ₂).
    want = b0 - 0.5 * (grads[0] + (0.9 * grads[0] + grads[1]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    by_hand = lars_by_hand(b0.tolist(), [g.tolist() for g in grads], is_weight=False, **HP)
    torch.testing.assert_close(got, torch.tensor(by_hand, dtype=torch.float64), rtol=0, atol=1e-15)


def test_lars_zero_weight_uses_trust_one():
    p0 = torch.zeros(2, 2, dtype=torch.float64)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(run_lars(p0, [g], **HP), -0.5 * g, rtol=0, atol=0)


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        LARS([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=1.5)


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


# Hand-written layer of every trainable parameter of tiny_vit() (depth 2): input side 0, blocks.i -> i + 1,
# everything after the blocks -> depth + 1 = 3.
def expected_layer(name: str) -> int:
    if name == "cls_token" or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks.0."):
        return 1
    if name.startswith("blocks.1."):
        return 2
    assert name.split(".")[0] in ("fc_norm", "norm", "head"), name
    return 3


@pytest.mark.parametrize("global_pool", [True, False])
def test_layer_decay_scales_match_hand_computation(global_pool):
    model = tiny_vit(global_pool=global_pool)
    decay = 0.75
    groups = param_groups(model, 0.05, layer_decay=decay)
    seen = set()
    for g in groups:
        layers = {expected_layer(n) for n in g["param_names"]}
        assert len(layers) == 1, f"a group mixes layers {layers}: {g['param_names']}"
        (layer,) = layers
        assert g["lr_scale"] == pytest.approx(decay ** (2 + 1 - layer), rel=1e-12)
        seen |= {(layer, g["weight_decay"] == 0)}
    assert len(seen) == len(groups), "groups must be keyed by (layer, decay / no decay)"
    assert {layer for layer, _ in seen} == {0, 1, 2, 3}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names_of(groups)) == sorted(trainable)  # each trainable parameter exactly once
    assert max(g["lr_scale"] for g in groups) == 1.0  # the head trains at the full lr
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.75**3)


def test_no_decay_for_embeddings_tokens_norms_biases_and_frozen_left_out():
    model = tiny_vit()
    model.pos_embed.requires_grad_(True)  # a learned table must still not be decayed
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert len(groups) == 2
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["param_names"]}
    assert {
        "pos_embed",
        "cls_token",
        "fc_norm.weight",
        "fc_norm.bias",
        "blocks.1.norm1.weight",
        "blocks.1.attn.qkv.bias",
        "head.bias",
        "patch_embed.proj.bias",
    } <= no_decay
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad} - {
        "pos_embed",
        "cls_token",
    }
    assert "blocks.0.attn.qkv.weight" not in no_decay | decay
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_mask_token_and_extra_no_decay():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.decoder_embed = nn.Linear(8, 8)
            self.table = nn.Parameter(torch.zeros(4, 8))

    groups = param_groups(Tokens(), 0.1, extra_no_decay=["table"])
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert no_decay == {"mask_token", "decoder_embed.bias", "table"}


def test_layer_ids_for_dit_layout():
    assert layer_id("x_embedder.proj.weight", 12) == 0
    assert layer_id("pos_embed", 12) == 0
    assert layer_id("blocks.11.adaLN_modulation.1.weight", 12) == 12
    assert layer_id("final_layer.linear.weight", 12) == 13
    assert layer_id("t_embedder.mlp.0.weight", 12) == 13
    # MAE's decoder blocks are not encoder blocks.
    assert layer_id("decoder_blocks.0.mlp.fc1.weight", 12) == 13


def test_layer_decay_needs_depth():
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(nn.Linear(2, 2), 0.05, layer_decay=0.75)


def test_build_optimizer_applies_lr_scale_and_keeps_names():
    model = tiny_vit()
    groups = param_groups(model, 0.05, layer_decay=0.5)
    opt = build_optimizer("adamw", groups, lr=1e-3, betas=(0.9, 0.95))
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["betas"] == (0.9, 0.95)
    assert opt.state_dict()["param_groups"][0]["param_names"] == groups[0]["param_names"]
    assert isinstance(build_optimizer("lars", groups, lr=0.1), LARS)
    assert isinstance(build_optimizer("sgd", groups, lr=0.1), torch.optim.SGD)
    assert build_optimizer("adamw", groups, lr=1e-3).defaults["fused"]  # fused by default, CPU included
    with pytest.raises(ValueError, match="'adamw', 'lars', 'sgd'"):
        build_optimizer("adam", groups, lr=1e-3)


def test_adamw_step_decays_only_decay_group():
    model = nn.Linear(3, 2)
    opt = build_optimizer("adamw", param_groups(model, 0.5), lr=0.1)
    before_w, before_b = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    opt.step()
    # Zero gradient: AdamW's update is the decoupled decay alone, p ← p·(1 − lr·wd), and nothing for the bias.
    torch.testing.assert_close(model.weight.detach(), before_w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(model.bias.detach(), before_b)


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------


def test_lr_schedule_values():
    kw = dict(base_lr=1e-3, warmup_steps=100, total_steps=1100, min_lr=1e-5)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(50, **kw) == pytest.approx(5e-4)
    assert lr_at(100, **kw) == pytest.approx(1e-3)  # warm-up end = cosine start
    mid = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(600, **kw) == pytest.approx(mid)
    quarter = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_at(350, **kw) == pytest.approx(quarter)
    assert lr_at(1100, **kw) == pytest.approx(1e-5)
    assert lr_at(5000, **kw) == pytest.approx(1e-5)  # held at min_lr, never climbs back
    assert lr_at(600, **kw, schedule="constant") == 1e-3
    assert lr_at(0.5, base_lr=1.0, warmup_steps=0, total_steps=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, base_lr=1.0, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, base_lr=1.0, warmup_steps=0, total_steps=5, schedule="step")


def test_apply_lr_scales_each_group():
    opt = build_optimizer("sgd", param_groups(tiny_vit(), 0.05, layer_decay=0.5), lr=1.0)
    apply_lr(opt, 0.2)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(
        sorted(0.2 * 0.5 ** (3 - layer) for layer in (0, 0, 1, 1, 2, 2, 3, 3))
    )

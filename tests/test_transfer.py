"""Pretrained MAE-layout weights -> DiT / ViT: values land where they should, and the report says so."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from usp import CheckpointError
from usp.models import create_model
from usp.models.transfer import TransferReport, transfer_weights
from usp.models.vit import VisionTransformer, resize_pos_embed, sincos_1d, sincos_2d
from usp.run.weights import load_weights, unwrap_state_dict


class _Opaque:
    """A pickled object that weights_only loading must refuse."""


BLOCK_PARAMS = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def mae_state(dim: int, depth: int, grid: int, patch: int = 2, channels: int = 4, seed: int = 0) -> dict:
    """A random state dict in the MAE / USP pretraining layout, decoder included, built by hand."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    state = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": r(1, 1, dim // 2),
        "patch_embed.proj.weight": r(dim, channels, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    shapes = {"norm1": [(dim,)], "norm2": [(dim,)], "attn.qkv": [(3 * dim, dim), (3 * dim,)],
              "attn.proj": [(dim, dim), (dim,)], "mlp.fc1": [(4 * dim, dim), (4 * dim,)],
              "mlp.fc2": [(dim, 4 * dim), (dim,)]}
    for i in range(depth):
        for name in BLOCK_PARAMS:
            w_shape, b_shape = shapes[name] * 2 if len(shapes[name]) == 1 else shapes[name]
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = r(*w_shape), r(*b_shape)
    state.update({"norm.weight": r(dim), "norm.bias": r(dim)})
    dec = dim // 2
    state.update({
        "decoder_embed.weight": r(dec, dim), "decoder_embed.bias": r(dec),
        "decoder_pos_embed": r(1, 1 + grid * grid, dec),
        "decoder_blocks.0.attn.qkv.weight": r(3 * dec, dec), "decoder_blocks.0.attn.qkv.bias": r(3 * dec),
        "decoder_norm.weight": r(dec), "decoder_norm.bias": r(dec),
        "decoder_pred.weight": r(patch * patch * channels, dec), "decoder_pred.bias": r(patch * patch * channels),
    })
    return state


def tiny_dit(**overrides):
    size = {"hidden_size": 192, "depth": 4, "num_heads": 3}  # fixed here, whatever the registry's "t" becomes
    return create_model("dit_t_2", **{"input_size": 8, "num_classes": 10, "affine_norms": True, **size, **overrides})


# --------------------------------------------------------------------------------------------
# Into DiT
# --------------------------------------------------------------------------------------------


def test_dit_blocks_equal_encoder_blocks_after_transfer():
    src = mae_state(192, 4, grid=4)
    dit = tiny_dit()
    report = transfer_weights(src, dit)
    state = dit.state_dict()
    for i in range(4):
        for name in BLOCK_PARAMS:
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{name}.{kind}"
                assert torch.equal(state[key], src[key]), key
    assert torch.equal(state["x_embedder.proj.weight"], src["patch_embed.proj.weight"])
    assert torch.equal(state["pos_embed"], src["pos_embed"][:, 1:])  # same grid: cls slot dropped, no resize
    assert report.resized == [] and "pos_embed" in report.loaded


def test_vit_b2_checkpoint_into_dit_b2_at_256px():
    """USP's case: pretrained on 28x28x4 latents (14x14 tokens), fine-tuned on 32x32 (16x16 tokens)."""
    torch.manual_seed(0)
    src = mae_state(768, 12, grid=14)
    dit = create_model("dit_b_2", input_size=32, affine_norms=True)
    report = transfer_weights(src, dit)

    decoder = [k for k in src if k.startswith("decoder_")]
    assert set(report.ignored) == {"cls_token", "mask_token", "norm.weight", "norm.bias", *decoder}
    expected_new = ["t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                    "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight"]
    expected_new += [f"blocks.{i}.adaLN_modulation.1.{k}" for i in range(12) for k in ("weight", "bias")]
    expected_new += [f"final_layer.{m}.{k}" for m in ("linear", "adaLN_modulation.1") for k in ("weight", "bias")]
    assert sorted(report.newly_initialised) == sorted(expected_new)
    assert report.resized == ["pos_embed"]
    state = dit.state_dict()
    # Every target key is in exactly one list, and loaded + resized cover everything else.
    listed = report.loaded + report.resized + report.newly_initialised
    assert sorted(listed) == sorted(state) and len(listed) == len(set(listed))
    assert len(report.loaded) == 2 + 12 * 12
    assert torch.equal(state["pos_embed"], resize_pos_embed(src["pos_embed"][:, 1:], 16, mode="bicubic"))
    assert torch.equal(state["blocks.11.mlp.fc2.weight"], src["blocks.11.mlp.fc2.weight"])
    # The new parts keep DiT's init: adaLN-Zero and a zero output layer.
    assert not state["blocks.5.adaLN_modulation.1.weight"].any() and not state["final_layer.linear.weight"].any()
    assert "14x14 -> 16x16 (bicubic)" in report.summary()


def test_plain_dit_target_ignores_block_norms():
    src = mae_state(192, 4, grid=4)
    report = transfer_weights(src, tiny_dit(affine_norms=False))
    norms = [f"blocks.{i}.norm{j}.{k}" for i in range(4) for j in (1, 2) for k in ("weight", "bias")]
    assert set(norms) <= set(report.ignored)
    assert not any(".norm" in k for k in report.loaded)


def test_bilinear_option_is_used():
    src = mae_state(192, 4, grid=2)
    dit = tiny_dit()
    report = transfer_weights(src, dit, interpolation="bilinear")
    assert torch.equal(dit.pos_embed, resize_pos_embed(src["pos_embed"][:, 1:], 4, mode="bilinear"))
    assert report.notes == ["pos_embed grid 2x2 -> 4x4 (bilinear)"]
    with pytest.raises(ValueError, match="interpolation must be one of"):
        transfer_weights(src, dit, interpolation="nearest")


def test_num_blocks_loads_only_the_first_blocks():
    src = mae_state(192, 4, grid=4)
    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    report = transfer_weights(src, dit, num_blocks=2)
    state = dit.state_dict()
    for key in state:
        if key.startswith(("blocks.0.", "blocks.1.")) and "adaLN" not in key:
            assert torch.equal(state[key], src[key]), key
        if key.startswith(("blocks.2.", "blocks.3.")):
            assert torch.equal(state[key], before[key]), key  # untouched fresh init
            assert key in report.newly_initialised
    assert "blocks.3.attn.qkv.weight" in report.ignored and "blocks.1.attn.qkv.weight" not in report.ignored


def test_missing_source_blocks_is_an_error_naming_them():
    src = mae_state(192, 2, grid=4)
    with pytest.raises(ValueError, match=r"source has 2 \(no 'blocks\.2\.\*'\)"):
        transfer_weights(src, tiny_dit())
    transfer_weights(src, tiny_dit(), num_blocks=2)  # asking for what exists is fine
    with pytest.raises(ValueError, match=r"num_blocks must lie in \[0, 4\]"):
        transfer_weights(src, tiny_dit(), num_blocks=5)


@pytest.mark.parametrize(
    ("src", "match"),
    [
        (mae_state(96, 4, grid=4), r"'patch_embed\.proj\.weight' \(96, 4, 2, 2\) into 'x_embedder\.proj\.weight' "
                                   r"\(192, 4, 2, 2\)"),
        (mae_state(192, 4, grid=2, patch=4), r"'patch_embed\.proj\.weight' \(192, 4, 4, 4\)"),
        (mae_state(192, 4, grid=4, channels=16), r"\(192, 16, 2, 2\) into 'x_embedder\.proj\.weight'"),
    ],
    ids=["width", "patch", "channels"],
)
def test_unresolvable_shape_mismatch_names_key_and_shapes(src, match):
    with pytest.raises(ValueError, match=match):
        transfer_weights(src, tiny_dit())


def test_checkpoint_wrapper_and_ddp_prefix_are_unwrapped():
    src = mae_state(192, 4, grid=4)
    wrapped = {"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 3}
    torch.manual_seed(0)
    a = tiny_dit()
    torch.manual_seed(0)
    b = tiny_dit()  # same fresh init, so the whole state dicts must agree
    report_a, report_b = transfer_weights(src, a), transfer_weights(unwrap_state_dict(wrapped), b)
    assert report_a == report_b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Into the ViT classifier
# --------------------------------------------------------------------------------------------


def test_vit_cls_classifier_matches_timm_on_the_same_weights():
    """Independent reference: timm's ViT (same key layout) loaded straight from the encoder weights."""
    timm = pytest.importorskip("timm")
    src = mae_state(192, 2, grid=4)
    vit = VisionTransformer(latent_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=10, global_pool=False)
    report = transfer_weights(src, vit)
    assert report.newly_initialised == ["head.weight", "head.bias"]
    assert set(report.ignored) == {k for k in src if k.startswith(("decoder_", "mask_token"))}
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=2, in_chans=4, embed_dim=192, depth=2, num_heads=3, num_classes=0
    )
    ref.load_state_dict({k: v for k, v in src.items() if not k.startswith(("decoder_", "mask_token"))}, strict=True)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), ref.forward_features(x)[:, 0], atol=1e-4, rtol=1e-4)


def test_vit_global_pool_keeps_new_head_and_resizes_with_cls_slot():
    src = mae_state(192, 2, grid=2)
    vit = VisionTransformer(latent_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=10, global_pool=True)
    report = transfer_weights(src, vit)
    assert sorted(report.newly_initialised) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias"} <= set(report.ignored)
    assert torch.equal(vit.cls_token, src["cls_token"])
    assert torch.equal(vit.pos_embed, resize_pos_embed(src["pos_embed"], 4, num_prefix_tokens=1))
    assert torch.equal(vit.pos_embed[:, :1], src["pos_embed"][:, :1])  # cls slot passes through


def test_unsupported_target_is_a_type_error():
    with pytest.raises(TypeError, match="DiT or a VisionTransformer"):
        transfer_weights(mae_state(192, 1, grid=2), torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Position-table resizing
# --------------------------------------------------------------------------------------------


def _sincos_at(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """The continuous sin-cos table at (possibly fractional) row/column positions, layout as sincos_2d."""
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def test_sincos_resize_to_own_size_is_identity():
    table = sincos_2d(768, 14).unsqueeze(0)
    assert torch.equal(resize_pos_embed(table, 14), table)


@pytest.mark.parametrize(("old", "new", "max_bound", "interior_bound"), [(14, 28, 0.2, 0.05), (14, 16, 0.05, 0.05)])
def test_sincos_resize_approximates_the_continuous_table(old, new, max_bound, interior_bound):
    """Resizing samples the old table at p_j = (j + 0.5)·old/new − 0.5 (align_corners=False); compare there.

    (The new grid spans the same extent, so it is not sincos_2d(dim, new), whose positions are 0..new−1.)
    """
    dim = 768
    resized = resize_pos_embed(sincos_2d(dim, old).unsqueeze(0), new, mode="bicubic")[0]
    positions = (torch.arange(new, dtype=torch.float64) + 0.5) * old / new - 0.5
    err = (resized - _sincos_at(dim, positions)).abs()
    interior = err.reshape(new, new, dim)[2:-2, 2:-2]
    print(f"sin-cos {old}->{new} bicubic: max abs error {err.max():.4f}, interior {interior.max():.4f}, "
          f"mean {err.mean():.5f}")
    # The worst cells are the borders, where bicubic clamps instead of extrapolating the highest frequency.
    assert err.max() < max_bound and interior.max() < interior_bound


# --------------------------------------------------------------------------------------------
# Files and report
# --------------------------------------------------------------------------------------------


def test_the_weights_reader_reads_pt_and_safetensors(tmp_path):
    src = {"a": torch.randn(3), "b.c": torch.randn(2, 2)}
    args = argparse.Namespace(model="vit_b_2", blr=1.5e-4)  # MAE-style checkpoints carry their arguments
    torch.save({"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 1, "args": args}, tmp_path / "ckpt.pth")
    save_file(src, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pth", "w.safetensors"):
        loaded, meta = load_weights(tmp_path / name)
        assert loaded.keys() == src.keys() and all(torch.equal(loaded[k], src[k]) for k in src) and meta == {}
    torch.save({"ema": src, "model": {"x": torch.zeros(1)}}, tmp_path / "both.pt")
    assert load_weights(tmp_path / "both.pt")[0].keys() == src.keys()  # EMA preferred, as DiT samples it
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
        load_weights(tmp_path / "nothing.pt")
    torch.save({"model": src, "extra": _Opaque()}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"holds a \S*_Opaque that weights_only loading refuses"):  # names it
        load_weights(tmp_path / "odd.pt")
    # Files that are not what their suffix says: one error naming the file, not the reader's own exception.
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="garbage.safetensors cannot be read .* not a safetensors file"):
        load_weights(tmp_path / "garbage.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt cannot be read .* not a torch checkpoint"):
        load_weights(tmp_path / "garbage.pt")
    whole = (tmp_path / "ckpt.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth cannot be read .* not a torch checkpoint"):
        load_weights(tmp_path / "truncated.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="suffix '.npz'"):
        load_weights(tmp_path / "w.npz")


def test_the_weights_reader_checks_the_digest_of_a_run_s_weights(tmp_path):
    # The reader model.init goes through is the verified one: a run's weights whose bytes changed are refused.
    from usp.run.checkpoint import save_weights

    path = save_weights(tmp_path, 3, {"w": torch.arange(4.0)}, {"task": "pretrain"})
    weights, meta = load_weights(tmp_path)  # a folder: its highest-step weights file
    assert weights["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and meta == {"task": "pretrain"}
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float (3.0) becomes +inf: the header and size are unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the digest"):
        load_weights(path)


def test_report_round_trips_through_json(tmp_path):
    report = transfer_weights(mae_state(192, 4, grid=2), tiny_dit())
    report.save(tmp_path / "transfer.json")
    restored = TransferReport(**json.loads((tmp_path / "transfer.json").read_text()))
    assert restored == report
    summary = report.summary()
    assert summary.startswith(f"transfer: {len(report.loaded)} loaded, 1 resized, ")
    assert "blocks.*.adaLN_modulation.1.weight (x4)" in summary

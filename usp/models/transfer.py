"""Pretrained USP weights (MAE layout) -> DiT/SiT backbone or ViT classifier.

Source layout (MAE / USP pretraining): `patch_embed.proj.*`, `cls_token` (1, 1, D), `pos_embed`
(1, 1+L, D) with the cls slot first, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
`norm.*`, and the decoder (`decoder_*`, `mask_token`) which no downstream model uses.

What goes where:
  DiT/SiT   x_embedder.proj <- patch_embed.proj; blocks.{i}.{attn,mlp}.* <- blocks.{i}.*; norm1/norm2 only
            when the target has affine norms (USP's VAE-simple block), else ignored; pos_embed <- pos_embed
            without its cls slot, resized to the target grid (USP pretrains at 224 px = 14x14 tokens, DiT runs
            at 256 px = 16x16). t_embedder, y_embedder, adaLN_modulation and final_layer keep their fresh init.
  ViT       patch_embed, cls_token, pos_embed (cls slot kept, grid resized), blocks; `norm` when the classifier
            reads the cls token; with global pooling `fc_norm` and `head` are new and `norm` is ignored.

Nothing is loaded with strict=False: the target's full state dict is assembled here and loaded strictly,
and every key of both sides ends up in exactly one list of the returned `TransferReport`. Transfer takes a
state dict: reading (and verifying) a weights file is `usp.run.weights`, so models know no file layout.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from usp.models.dit import DiT
from usp.models.vit import VisionTransformer, resize_pos_embed

INTERPOLATIONS = ("bicubic", "bilinear")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Parameters of an encoder block that a downstream block can take over (adaLN_modulation is DiT's own).
# LightningDiT's blocks add qk-norms and SwiGLU's w12/w3 (usp.models.lightningdit), transferred from its encoder block.
_BLOCK_PARAMS = re.compile(
    r"^(norm1|norm2|attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)$")


@dataclass
class TransferReport:
    """Where each key went. loaded/resized/newly_initialised name target keys; ignored names source keys."""

    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    newly_initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for the log: counts, then each list with per-block keys folded into `blocks.*`."""
        lines = [
            f"transfer: {len(self.loaded)} loaded, {len(self.resized)} resized, "
            f"{len(self.newly_initialised)} newly initialised, {len(self.ignored)} ignored"
        ]
        for name in ("resized", "newly_initialised", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name}: {_fold(keys)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _fold(keys: list[str]) -> str:
    """['blocks.0.a', 'blocks.1.a', 'x'] -> 'blocks.*.a (x2), x' (first-seen order)."""
    counts: dict[str, int] = {}
    for key in keys:
        pattern = _BLOCK_KEY.sub(r"blocks.*.\2", key)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(p if n == 1 else f"{p} (x{n})" for p, n in counts.items())


# --------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------


def _source_depth(source: Mapping[str, torch.Tensor]) -> int:
    indices = [int(m.group(1)) for key in source if (m := _BLOCK_KEY.match(key))]
    return max(indices) + 1 if indices else 0


def _plan(target: nn.Module, target_keys: list[str], num_blocks: int) -> dict[str, str]:
    """{target key: source key} for every directly copied tensor (pos_embed is handled apart)."""
    if isinstance(target, DiT):
        plan = {"x_embedder.proj.weight": "patch_embed.proj.weight", "x_embedder.proj.bias": "patch_embed.proj.bias"}
    else:
        plan = {k: k for k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token")}
        if not target.global_pool:  # the cls-token classifier keeps the encoder's final norm
            plan.update({"norm.weight": "norm.weight", "norm.bias": "norm.bias"})
    for key in target_keys:
        m = _BLOCK_KEY.match(key)
        if m and int(m.group(1)) < num_blocks and _BLOCK_PARAMS.match(m.group(2)):
            plan[key] = key
    return plan


def _check_shape(target_key: str, source_key: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape:
        raise ValueError(f"cannot transfer {source_key!r} {tuple(got.shape)} into {target_key!r} {tuple(want.shape)}: "
                         "the width, patch size or input channels of the two models differ")


def _transfer_pos_embed(
    source: Mapping[str, torch.Tensor], want: torch.Tensor, keep_cls: bool, interpolation: str
) -> tuple[torch.Tensor, str | None]:
    """Source (1, [1+]L_s, D) -> target (1, [1+]L_t, D); returns the table and a note if it was resized."""
    if "pos_embed" not in source:
        raise ValueError("source state has no 'pos_embed' (needed for the target's 'pos_embed')")
    table = source["pos_embed"]
    prefix = 1 if "cls_token" in source else 0
    if table.ndim != 3 or table.shape[-1] != want.shape[-1]:
        raise ValueError(f"cannot transfer 'pos_embed' {tuple(table.shape)} into 'pos_embed' {tuple(want.shape)}: "
                         "the widths differ")
    if keep_cls and prefix == 0:
        raise ValueError("source state has no 'cls_token' (needed for the target's 'cls_token' and pos_embed slot)")
    if not keep_cls:
        table, prefix = table[:, prefix:], 0  # DiT has no cls token: drop its slot
    old_side = math.isqrt(table.shape[1] - prefix)
    new_side = math.isqrt(want.shape[1] - prefix)
    if old_side * old_side != table.shape[1] - prefix or new_side * new_side != want.shape[1] - prefix:
        raise ValueError(f"'pos_embed' {tuple(source['pos_embed'].shape)} -> {tuple(want.shape)}: only square "
                         "token grids can be resized")
    if old_side == new_side:
        return table, None
    resized = resize_pos_embed(table, new_side, num_prefix_tokens=prefix, mode=interpolation)
    return resized, f"pos_embed grid {old_side}x{old_side} -> {new_side}x{new_side} ({interpolation})"


def transfer_weights(
    source_state: Mapping[str, torch.Tensor],
    target: nn.Module,
    *,
    num_blocks: int | None = None,
    interpolation: str = "bicubic",
) -> TransferReport:
    """Load pretrained MAE-layout weights into a `DiT` or `VisionTransformer`, in place.

    source_state: a flat state dict (`usp.run.weights.load_weights` reads one from any checkpoint file).
    num_blocks: take over only the first N encoder blocks (default: the target's depth); the target's
        later blocks keep their fresh initialisation.
    interpolation: 'bicubic' (USP, MAE and DeiT's choice) or 'bilinear', for a position grid that differs.
    Raises ValueError naming the key when a shape cannot be reconciled or the source lacks a needed key.
    """
    if not isinstance(target, (DiT, VisionTransformer)):
        raise TypeError(f"transfer target must be a DiT or a VisionTransformer, got {type(target).__name__}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    source = dict(source_state)
    depth = len(target.blocks)
    num_blocks = depth if num_blocks is None else num_blocks
    if not 0 <= num_blocks <= depth:
        raise ValueError(f"num_blocks must lie in [0, {depth}] (the target's depth), got {num_blocks}")
    source_depth = _source_depth(source)
    if num_blocks > source_depth:
        raise ValueError(f"the target asks for {num_blocks} pretrained blocks but the source has {source_depth} "
                         f"(no 'blocks.{source_depth}.*'); pass num_blocks<={source_depth}")

    state = target.state_dict()
    report = TransferReport()
    used: set[str] = set()
    plan = _plan(target, list(state), num_blocks)
    for target_key, source_key in plan.items():
        if source_key not in source:
            hint = ("; LightningDiT's SwiGLU/qk-norm blocks transfer from USP's vit_*_lightning encoder, not a plain "
                    "ViT" if re.search(r"mlp\.w12|mlp\.w3|_norm\.", source_key) else "")
            raise ValueError(f"source state has no {source_key!r} (needed for the target's {target_key!r}){hint}")
        _check_shape(target_key, source_key, source[source_key], state[target_key])
        state[target_key] = source[source_key]
        used.add(source_key)
        report.loaded.append(target_key)

    table, note = _transfer_pos_embed(source, state["pos_embed"], isinstance(target, VisionTransformer), interpolation)
    _check_shape("pos_embed", "pos_embed", table, state["pos_embed"])
    state["pos_embed"] = table
    used.add("pos_embed")
    (report.resized if note else report.loaded).append("pos_embed")
    if note:
        report.notes.append(note)

    report.newly_initialised = [k for k in state if k not in plan and k != "pos_embed"]
    report.ignored = [k for k in source if k not in used]
    # Keep the target's order in `loaded` so the report reads like the model.
    order = {k: i for i, k in enumerate(state)}
    report.loaded.sort(key=order.__getitem__)
    target.load_state_dict(state, strict=True)
    return report

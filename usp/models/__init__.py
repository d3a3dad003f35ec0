"""The networks, and the one registry of named variants that recipes, the CLI and the contract tests share.

A name is `<family>_<size>_<patch>`: `vit_b_2` (the USP/MAE pretraining model), `vit_b_2_cls` (the ViT
classifier of the same encoder), `dit_xl_2`, `sit_xl_2`. Sizes come from one table (`SIZES`); the patch
size is the one over latents (2 for SD-VAE f8 latents, 1 for f16 latents such as KL-16).

Files: vit.py (shared blocks, position embeddings, the classifier), mae.py (the pretraining model), dit.py
(DiT/SiT), lightningdit.py (LightningDiT: RMSNorm, SwiGLU, 2-D RoPE; its encoder block), transfer.py (pretrained
weights -> DiT/SiT/ViT, with a report). May import: torch, timm, safetensors; nothing else of usp (models know
nothing of files of a run, data or distributed training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch.nn as nn

from usp.models.dit import DiT
from usp.models.lightningdit import LightningDiT
from usp.models.mae import PAPER_DECODER, SMALL_DECODER, MaskedLatentAutoencoder
from usp.models.vit import VisionTransformer


@dataclass(frozen=True)
class ModelSize:
    width: int
    depth: int
    heads: int


# S/B/L/XL as in ViT / DiT Table 1 (USP uses B, L, XL). "t" (tiny) is ours, for tests and the CPU demo:
# 64-wide heads like every other size, small enough that a 2-core CPU trains it for thousands of steps.
SIZES: dict[str, ModelSize] = {
    "t": ModelSize(128, 4, 2),
    "s": ModelSize(384, 12, 6),
    "b": ModelSize(768, 12, 12),
    "l": ModelSize(1024, 24, 16),
    "xl": ModelSize(1152, 28, 16),
}
# Latent patch sizes: 1 for f16 latents (KL-16, VA-VAE) and the 8×8 latents of the embedded default,
# 2 for SD-VAE f8 latents (the paper's /2 models), 4 and 8 for coarse ablations (DiT only).
ENCODER_PATCH_SIZES = (1, 2, 4)
DIT_PATCH_SIZES = (1, 2, 4, 8)
# LightningDiT: the official B/L/XL at patch 1 (VA-VAE f16 latents) and 2, and the tiny size for tests and the demo.
LIGHTNING_SIZES = ("t", "b", "l", "xl")
LIGHTNING_PATCH_SIZES = (1, 2)

# SiT differs from DiT only in its default flags: same network and checkpoint layout (learn_sigma=True,
# 8 output channels), but forward returns the first in_channels channels, as SiT's own model does.
GENERATOR_DEFAULTS: dict[str, dict[str, object]] = {
    "dit": {"learn_sigma": True, "output_sigma": True},
    "sit": {"learn_sigma": True, "output_sigma": False},
}
FAMILIES = {
    "vit": "USP/MAE pretraining model (masked latent modeling), encoder + light decoder",
    "vit_cls": "ViT classifier over latents (linear probe / fine-tuning), same encoder as vit_*",
    "dit": "DiT (adaLN-Zero, DDPM with learned sigma)",
    "sit": "SiT (DiT network, transport objective)",
    "lightningdit": "LightningDiT (SwiGLU, RMSNorm, 2-D RoPE; transport objective)",
    "vit_lightning": "USP pretraining model whose encoder has LightningDiT's blocks (transfers into lightningdit_*)",
}
# The options LightningDiT's released VA-VAE models use (configs/lightningdit_xl_vavae_f16d32.yaml); the encoder of
# vit_*_lightning uses the same, so that every block parameter has a counterpart.
LIGHTNING_OPTIONS: dict[str, bool] = {"use_qknorm": False, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str  # a key of FAMILIES
    size: str  # a key of SIZES
    patch_size: int
    build: Callable[..., nn.Module]

    @property
    def description(self) -> str:
        s = SIZES[self.size]
        return f"{FAMILIES[self.family]}; width {s.width}, depth {s.depth}, heads {s.heads}, patch {self.patch_size}"


def _pretraining_model(size: str, patch_size: int, **overrides) -> MaskedLatentAutoencoder:
    s = SIZES[size]
    decoder = SMALL_DECODER if size == "t" else PAPER_DECODER
    kwargs = dict(patch_size=patch_size, embed_dim=s.width, depth=s.depth, num_heads=s.heads, **decoder)
    return MaskedLatentAutoencoder(**{**kwargs, **overrides})


def _lightning_pretraining_model(size: str, patch_size: int, **overrides) -> MaskedLatentAutoencoder:
    """overrides may name the block options (use_swiglu, ...) beside the constructor's arguments."""
    options = {k: overrides.pop(k, v) for k, v in LIGHTNING_OPTIONS.items()}
    return _pretraining_model(size, patch_size, block_options=options, **overrides)


def _classifier(size: str, patch_size: int, **overrides) -> VisionTransformer:
    s = SIZES[size]
    kwargs = dict(patch_size=patch_size, embed_dim=s.width, depth=s.depth, num_heads=s.heads)
    return VisionTransformer(**{**kwargs, **overrides})


def _generator(family: str, size: str, patch_size: int, **overrides) -> DiT:
    s = SIZES[size]
    kwargs = dict(hidden_size=s.width, depth=s.depth, num_heads=s.heads, patch_size=patch_size)
    return DiT(**{**kwargs, **GENERATOR_DEFAULTS[family], **overrides})


def _lightningdit(size: str, patch_size: int, **overrides) -> LightningDiT:
    s = SIZES[size]
    kwargs = dict(hidden_size=s.width, depth=s.depth, num_heads=s.heads, patch_size=patch_size, **LIGHTNING_OPTIONS)
    return LightningDiT(**{**kwargs, **overrides})


def _entries() -> dict[str, ModelEntry]:
    entries: list[ModelEntry] = []
    for size in SIZES:
        entries += [ModelEntry(f"vit_{size}_{p}", "vit", size, p, partial(_pretraining_model, size, p))
                    for p in ENCODER_PATCH_SIZES]
    for size in SIZES:
        entries += [ModelEntry(f"vit_{size}_{p}_cls", "vit_cls", size, p, partial(_classifier, size, p))
                    for p in ENCODER_PATCH_SIZES]
    for family in GENERATOR_DEFAULTS:
        for size in SIZES:
            entries += [ModelEntry(f"{family}_{size}_{p}", family, size, p, partial(_generator, family, size, p))
                        for p in DIT_PATCH_SIZES]
    for size in LIGHTNING_SIZES:
        entries += [ModelEntry(f"lightningdit_{size}_{p}", "lightningdit", size, p, partial(_lightningdit, size, p))
                    for p in LIGHTNING_PATCH_SIZES]
        entries += [ModelEntry(f"vit_{size}_{p}_lightning", "vit_lightning", size, p,
                               partial(_lightning_pretraining_model, size, p)) for p in LIGHTNING_PATCH_SIZES]
    return {entry.name: entry for entry in entries}


REGISTRY: dict[str, ModelEntry] = _entries()


def list_models(family: str | None = None) -> list[str]:
    """Registered names, optionally of one family (vit, vit_cls, dit, sit, lightningdit, vit_lightning)."""
    return [name for name, entry in REGISTRY.items() if family is None or entry.family == family]


def model_entry(name: str, families: tuple[str, ...] | None = None) -> ModelEntry:
    """The registry entry of `name`; an error lists the names of the wanted families when it is unknown."""
    entry = REGISTRY.get(name)
    if entry is None or (families and entry.family not in families):
        choices = list_models() if not families else [n for f in families for n in list_models(f)]
        what = "model" if not families else "/".join(families) + " model"
        raise ValueError(f"model.name={name!r} is not a registered {what}; choose one of: {', '.join(choices)}")
    return entry


def create_model(name: str, families: tuple[str, ...] | None = None, **overrides) -> nn.Module:
    """Build a registered variant, e.g. `create_model("dit_xl_2", input_size=32, affine_norms=True)`."""
    return model_entry(name, families).build(**overrides)


def classifier_for(name: str) -> str:
    """The classifier of a name: `vit_b_2` (the encoder a USP checkpoint holds) -> `vit_b_2_cls`."""
    entry = model_entry(name, ("vit", "vit_cls"))
    if entry.family == "vit_cls":
        return entry.name
    return next(e.name for e in REGISTRY.values()
                if e.family == "vit_cls" and e.size == entry.size and e.patch_size == entry.patch_size)


__all__ = ["REGISTRY", "SIZES", "DiT", "LightningDiT", "MaskedLatentAutoencoder", "ModelEntry", "ModelSize",
           "VisionTransformer", "classifier_for", "create_model", "list_models", "model_entry"]

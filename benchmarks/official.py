"""The official implementations, imported from checkouts whose paths the user gives (nothing of them is vendored).

    --official-usp  a clone of AMAP-ML/USP (or its pretrain/ folder): pretrain/models_mae.py, USP's MAE
    --official-dit  a clone of facebookresearch/DiT (or AMAP-ML/USP/generation/DiT): models.py, diffusion/
    --official-sit  a clone of willisma/SiT (or AMAP-ML/USP/generation/SiT): models.py, transport/

Each checkout's top-level modules (`models`, `diffusion`, `transport`, `util`) would collide with each other,
so each is loaded under a private name and removed from `sys.modules` again; the loaded modules keep working.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

# Environment variables that tests read to find checkouts (tests skip the comparisons when they are unset).
ENV = {"usp": "USP_OFFICIAL_USP", "dit": "USP_OFFICIAL_DIT", "sit": "USP_OFFICIAL_SIT"}


def _root(path: str | Path, inside: str, marker: str, what: str) -> Path:
    """The folder holding `marker`: `path` itself or `path/inside` (a repository clone given at its top)."""
    for root in (Path(path), Path(path) / inside):
        if (root / marker).is_file():
            return root.resolve()
    raise FileNotFoundError(f"{path}: no {marker} here or under {inside}/; pass a clone of {what}")


@contextlib.contextmanager
def _isolated_imports(root: Path, names: tuple[str, ...]) -> Iterator[None]:
    """Import with `root` first on sys.path; afterwards drop what it added under `names` from sys.modules."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[key]
        sys.modules.update(saved)


def _import(root: Path, module: str, names: tuple[str, ...]) -> ModuleType:
    with _isolated_imports(root, names):
        return importlib.import_module(module)


@contextlib.contextmanager
def _numpy_float32_kept() -> Iterator[None]:
    """USP's util/pos_embed.py sets `np.float = np.float32 = float` when imported (a NumPy ≥ 1.24 shim), which
    would turn every later `dtype=np.float32` of the process into float64: put np.float32 back after the import.
    `np.float` (removed from NumPy, once an alias of float) stays, because the official functions call it."""
    import numpy as np

    saved = np.float32
    try:
        yield
    finally:
        np.float32 = saved


def load_usp(path: str | Path) -> SimpleNamespace:
    """AMAP-ML/USP's pretraining MAE (models_mae.MaskedAutoencoderViT, built on timm's Block)."""
    root = _root(path, "pretrain", "models_mae.py", "AMAP-ML/USP")
    with _numpy_float32_kept():
        return SimpleNamespace(root=root, models_mae=_import(root, "models_mae", ("models_mae", "util")))


def load_dit(path: str | Path) -> SimpleNamespace:
    """DiT's models (DiT_models) and diffusion package (create_diffusion)."""
    root = _root(path, "generation/DiT", "models.py", "facebookresearch/DiT")
    names = ("models", "diffusion")
    models, diffusion = _import(root, "models", names), _import(root, "diffusion", names)
    return SimpleNamespace(root=root, models=models, diffusion=diffusion)


def load_sit(path: str | Path) -> SimpleNamespace:
    """SiT's models (SiT_models) and transport package (create_transport, Sampler)."""
    root = _root(path, "generation/SiT", "models.py", "willisma/SiT")
    names = ("models", "transport")
    models, transport = _import(root, "models", names), _import(root, "transport", names)
    return SimpleNamespace(root=root, models=models, transport=transport)


def from_env(kind: str) -> SimpleNamespace | None:
    """The checkout named by the environment variable ENV[kind], loaded; None when unset."""
    path = os.environ.get(ENV[kind])
    if not path:
        return None
    return {"usp": load_usp, "dit": load_dit, "sit": load_sit}[kind](path)


# --------------------------------------------------------------------------------------------
# Official models with usp's weights
# --------------------------------------------------------------------------------------------


def official_mae(official: SimpleNamespace, usp_model) -> object:
    """USP's MaskedAutoencoderViT of usp_model's sizes, with usp_model's weights (strict load: same key layout)."""
    from functools import partial

    import torch.nn as nn

    m = usp_model
    block = m.blocks[0]
    ref = official.models_mae.MaskedAutoencoderViT(
        img_size=m.latent_size, patch_size=m.patch_size, in_chans=m.in_channels,
        embed_dim=m.patch_embed.proj.out_channels, depth=len(m.blocks), num_heads=block.attn.num_heads,
        decoder_embed_dim=m.decoder_embed.out_features, decoder_depth=len(m.decoder_blocks),
        decoder_num_heads=m.decoder_blocks[0].attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / block.mlp.fc1.in_features,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=m.norm_pix_loss)
    ref.load_state_dict(m.state_dict(), strict=True)
    return ref


def official_generator(official: SimpleNamespace, usp_model, family: str) -> object:
    """DiT's DiT or SiT's SiT of usp_model's sizes, with usp_model's weights (strict load)."""
    m = usp_model
    cls = official.models.DiT if family == "dit" else official.models.SiT
    ref = cls(input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels,
              hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
              class_dropout_prob=m.y_embedder.dropout_prob, num_classes=m.y_embedder.num_classes,
              learn_sigma=m.learn_sigma)
    ref.load_state_dict(m.state_dict(), strict=True)
    return ref

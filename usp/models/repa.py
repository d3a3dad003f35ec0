"""REPA (Yu et al., ICLR 2025): align a DiT/SiT block's hidden tokens with a frozen image encoder's patch tokens.

Three pieces, written from the paper and checked against the public REPA code's numerics and key names:
- the projector, an MLP D -> 2048 -> 2048 -> D_teacher with SiLU (REPA `build_mlp`), attached to the generator
  as `projectors.<k>` so that a REPA SiT checkpoint (`projectors.0.0.weight`, ...) loads strictly into
  `create_model("sit_xl_2")` + `attach_projectors`; the exported sampling weights drop it (`strip_projectors`);
- the loss, REPA eq. 8: −(1/N·T) Σ cos(h_φ(h_t[n, t]), y*[n, t]), averaged over teachers;
- the frozen teacher, a timm ViT built by name with pretrained=False and loaded strictly, whose patch tokens
  (class and register tokens dropped, after the final norm: DINOv2's `x_norm_patchtokens`) are the targets.

The teacher is loaded, never trained: eval mode, requires_grad False, and its input preparation (the value
range, its normalisation, the resize to its resolution) lives here, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("usp")

PROJECTOR_DIM = 2048  # REPA models/sit.py `projector_dim` default, used for every reported model
PROJECTOR_PREFIX = "projectors."
DEFAULT_TEACHER = "vit_base_patch14_dinov2"  # REPA's default encoder, DINOv2 ViT-B/14 (no registers)


def build_projector(hidden_size: int, teacher_dim: int, projector_dim: int = PROJECTOR_DIM) -> nn.Sequential:
    """(.., hidden_size) -> (.., teacher_dim): Linear, SiLU, Linear, SiLU, Linear (keys 0, 2, 4 as REPA's)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, teacher_dim))


def attach_projectors(model: nn.Module, teacher_dims: list[int], projector_dim: int = PROJECTOR_DIM) -> nn.ModuleList:
    """Give `model` (a DiT/SiT) REPA's `projectors` ModuleList, one MLP per teacher, xavier-uniform initialised as
    REPA initialises every Linear of its SiT. The generator's own forward never calls it."""
    projectors = nn.ModuleList([build_projector(model.hidden_size, d, projector_dim) for d in teacher_dims])
    for layer in projectors.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    model.projectors = projectors
    return projectors


def strip_projectors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generator's own weights: every key but the projectors' (what sampling and transfer read)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_PREFIX)}


def projection_loss(projected: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """REPA eq. 8: projected[k], targets[k]: (N, T, D_k) -> −mean over k, n, t of cos(projected, target).

    As REPA's loss.py: each token normalised to unit length, the dot product averaged over tokens and batch,
    then over teachers."""
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"{len(projected)} projected token sets for {len(targets)} teachers")
    total = projected[0].new_zeros(())
    for z, y in zip(projected, targets):
        if z.shape != y.shape:
            raise ValueError(f"projected tokens {tuple(z.shape)} and teacher tokens {tuple(y.shape)} differ; the "
                             "teacher grid must be matched to the generator's (match_grid)")
        total = total - (F.normalize(z.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1).mean()
    return total / len(projected)


def match_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """tokens: (N, g·g, D) on a g×g grid -> (N, grid·grid, D): area-averaged when g is a multiple of grid
    (each generator token gets the mean of the teacher tokens over its patch), bilinear otherwise."""
    n, count, dim = tokens.shape
    side = round(count**0.5)
    if side * side != count:
        raise ValueError(f"{count} teacher tokens do not form a square grid")
    if side == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(n, dim, side, side)  # (N, D, g, g)
    mode = "area" if side % grid == 0 else "bilinear"
    x = F.interpolate(x.float(), size=(grid, grid), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x.reshape(n, dim, grid * grid).transpose(1, 2).to(tokens.dtype)  # (N, grid², D)


class Teacher(nn.Module):
    """A frozen timm ViT whose patch tokens are REPA's targets. `tokens` takes usp images in [-1, 1]."""

    def __init__(self, encoder: nn.Module, name: str):
        super().__init__()
        self.encoder, self.name = encoder.eval().requires_grad_(False), name
        cfg = getattr(encoder, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, -1, 1, 1), persistent=False)
        self.image_size = int(encoder.patch_embed.img_size[0])
        self.grid = int(encoder.patch_embed.grid_size[0])
        self.dim = int(encoder.embed_dim)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: BatchNorm/dropout never switch to training behaviour

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) in [-1, 1] -> (N, T, D) patch tokens after the final norm, no cls/registers.

        As REPA's train.py prepares DINOv2 input: [0, 1], the teacher's mean/std, then a bicubic resize to the
        teacher's resolution (224 for 256 px images)."""
        x = (images.float() + 1) / 2  # (N, C, H, W) in [0, 1]
        if x.shape[1] == 1 and self.in_chans == 3:  # grey images: the same value on every channel
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        features = self.encoder.forward_features(x)  # (N, prefix + T, D)
        return features[:, self.encoder.num_prefix_tokens :].float()  # (N, T, D)


def build_teacher_encoder(name: str = DEFAULT_TEACHER, img_size: int | None = None, **model_kwargs) -> nn.Module:
    """The timm model `name` with random weights (pretrained=False); img_size overrides its resolution."""
    import timm

    if img_size is not None:
        model_kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    except RuntimeError as err:
        raise ValueError(f"repa.teacher={name!r} is not a timm model ({err}); use a timm ViT name such as "
                         f"{DEFAULT_TEACHER!r}") from err


def load_teacher_weights(encoder: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                         assign: bool = False) -> None:
    """Strictly load `state_dict` (timm layout) into the teacher encoder, resampling its position table to the
    encoder's grid as timm does for pretrained weights; a missing/unexpected key is a ValueError naming it."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state_dict.items() if not k.startswith("head.")}  # num_classes=0: no classifier
    if state.get("pos_embed") is not None and state["pos_embed"].device.type != "meta":
        state = checkpoint_filter_fn(state, encoder)
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"teacher weights {source} do not match the timm model ({type(encoder).__name__}): "
            + "; ".join(part for part in (
                f"missing keys {missing[:5]}" if missing else "", f"unexpected keys {unexpected[:5]}" if unexpected
                else "", "shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in wrong[:5]) if wrong else "") if part)
            + "; check repa.teacher names the model the weights were saved from")
    encoder.load_state_dict(state, strict=True, assign=assign)


def load_teacher(name: str = DEFAULT_TEACHER, weights: str | Mapping[str, torch.Tensor] | None = None,
                 img_size: int | None = None, device: torch.device | str = "cpu", *, timm_kwargs: dict | None = None,
                 source: str = "state dict") -> Teacher:
    """The frozen teacher `name` (a timm ViT) with `weights`: a state dict in timm's layout (a file is read by
    `usp.run.weights`; `timm_kwargs` are extra constructor arguments, for small stand-in teachers), or "timm" /
    an "hf-hub:<id>" to use timm's own pretrained download (needs network access once)."""
    if weights is None:
        raise ValueError("repa.teacher_weights is not set: a random teacher aligns to noise; give a weights file, or "
                         "'timm' to download the pretrained weights of repa.teacher")
    if isinstance(weights, str):
        if weights != "timm" and not weights.startswith("hf-hub:"):
            raise ValueError(f"teacher weights {weights!r}: a file is read by usp.run.weights.load_weights and its "
                             "state dict passed here; a string names timm's download ('timm' or 'hf-hub:<id>')")
        import timm

        overlay = {"hf_hub_id": weights.removeprefix("hf-hub:")} if weights != "timm" else None
        try:
            encoder = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                                        **({"img_size": img_size} if img_size else {}))
        except OSError as err:  # offline, or not in the hub cache: name the key that takes a local file
            raise FileNotFoundError(
                f"cannot download the REPA teacher {name!r} (repa.teacher_weights={weights}: "
                f"{str(err).splitlines()[0]}). Without network: set repa.teacher_weights to a local file of its "
                "weights in timm's layout (.safetensors / .pt), or HF_HOME to a Hugging Face cache that holds them"
            ) from err
        return Teacher(encoder, name).to(device)
    kwargs = dict(timm_kwargs or {})
    if img_size is not None:  # the recipe's resolution wins over the file's (the position table is resampled)
        kwargs["img_size"] = img_size
    encoder = build_teacher_encoder(name, **kwargs)
    load_teacher_weights(encoder, dict(weights), source)
    return Teacher(encoder, name).to(device)


def save_teacher(encoder: nn.Module, path: str | Path, timm_kwargs: dict) -> None:
    """Write a (stand-in) teacher's weights as safetensors with the timm arguments `load_teacher` needs."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    save_file(tensors, str(path), metadata={"timm_kwargs": json.dumps(timm_kwargs)})

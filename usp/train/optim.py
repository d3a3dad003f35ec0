"""Optimisation pieces shared by every task: parameter groups, layer-wise lr decay, LARS, lr schedule.

The numerics follow MAE (He et al., 2022), which USP's pretraining and ViT fine-tuning recipes reuse:
- weight decay only on weight matrices (no decay on 1-D params, position embeddings, cls/mask tokens);
- layer-wise lr decay for fine-tuning as BEiT/MAE: a parameter at depth `layer_id` gets
  ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``, so the head trains at the full lr and
  the patch embedding at ``layer_decay ** (num_layers + 1)``;
- LARS (with MoCo v3's trust ratio) for the linear probe;
- linear warm-up then half-cycle cosine, evaluated every iteration (not every epoch).

Learning rates are always derived from a base lr: ``lr = blr * global_batch / 256`` (docs/conventions.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn as nn

# Parameters that are never weight-decayed whatever their shape, matched on the last dotted component of
# the name. Decaying them pulls a learned position table or a token towards zero, which the ViT/MAE
# recipes avoid (timm's `no_weight_decay()` lists the same names).
NO_WEIGHT_DECAY_NAMES: frozenset[str] = frozenset(
    {"pos_embed", "decoder_pos_embed", "cls_token", "dist_token", "mask_token"}
)

# Name prefixes of the input embedding, which sits at layer 0 with the cls token and position table.
# `patch_embed` is the ViT/MAE name, `x_embedder` the DiT/SiT one.
INPUT_EMBED_PREFIXES: tuple[str, ...] = ("patch_embed", "x_embedder")
LAYER0_NAMES: frozenset[str] = frozenset({"cls_token", "pos_embed", "mask_token", "dist_token"})

OptimizerName = Literal["adamw", "lars", "sgd"]


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the input embedding, i + 1 for `blocks.i`,
    num_layers + 1 for everything after the blocks (final norm, head, DiT's final layer and embedders).
    """
    if name in LAYER0_NAMES or name.startswith(INPUT_EMBED_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def _skips_decay(name: str, param: torch.Tensor, extra: frozenset[str]) -> bool:
    # 1-D (and 0-D) tensors are biases and norm scales/shifts: decaying them only hurts (MAE, timm).
    last = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or last in NO_WEIGHT_DECAY_NAMES or name in extra or last in extra


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    extra_no_decay: Iterable[str] = (),
    official: bool = False,
) -> list[dict]:
    """Split the trainable parameters of `model` into optimizer groups.

    Frozen parameters (requires_grad False) are left out entirely. Each group is a dict with keys
    `params`, `param_names` (understood by torch.optim's state dict), `weight_decay` and `lr_scale`
    (multiplied into the lr by `apply_lr`). Without `layer_decay` there are at most two groups
    (decay, no decay) with lr_scale 1; with it, one group per (layer, decay / no decay), in the order the
    parameters first appear. `num_layers` defaults to `model.num_layers` or `len(model.blocks)`.
    `extra_no_decay` adds exact parameter names or last name components that are not decayed.
    official=True reproduces the official MAE/USP pretraining groups (timm's `param_groups_weight_decay`): only
    1-D tensors and biases escape decay, so the cls and mask tokens *are* decayed; usp's default leaves them alone.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if num_layers is None:
            num_layers = getattr(model, "num_layers", None)
            if num_layers is None and hasattr(model, "blocks"):
                num_layers = len(model.blocks)
            if num_layers is None:
                raise ValueError(f"layer_decay needs num_layers: {type(model).__name__} has no .num_layers or .blocks")
    extra = frozenset(extra_no_decay)

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (param.ndim <= 1 or name.endswith(".bias")) if official else _skips_decay(name, param, extra)
        layer = layer_id(name, num_layers) if layer_decay is not None else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as the MAE / MoCo v3 linear probe uses it.

    For a weight (ndim > 1) with gradient g:  u = g + wd·p;  u ← u · η‖p‖/‖u‖ (1 when either norm is 0).
    Biases and norm parameters (ndim ≤ 1) use u = g: no weight decay and no trust ratio.
    Then, for every parameter:  μ ← momentum·μ + u;  p ← p − lr·μ  (μ starts at 0, so μ₁ = u₁).

    Scale: a weight's step is lr·η·‖p‖ whatever its gradient, so over a run a weight can grow or turn by at
    most about `lars_travel` = η·Σ_t lr_t / (1 − momentum) (in log-norm, or radians). With lr = blr·batch/256
    that sum is blr·epochs·images/256 (times the schedule's mean): the batch size cancels but the dataset
    size does not. The paper's probe (blr 0.1, 90 epochs, ImageNet's 1.28 M images) has a travel of ~220;
    the same blr on 60 k images for 10 epochs gives ~1 and on a few thousand images ~0.1, where a head
    initialised at std 0.01 keeps its random direction. `ClassifierTask` scales the probe's lr by
    reference images / dataset images (`classify.lars_reference_images`) to keep the paper's travel per epoch.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # torch.where keeps this on the device (no host sync for the `> 0` tests).
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def lars_travel(lrs: Iterable[float], momentum: float = 0.9, trust_coefficient: float = 0.001) -> float:
    """η·Σ lr_t / (1 − momentum): how far (log-norm or radians) LARS can move a weight over the given
    per-step learning rates. Below ~2 a randomly initialised linear head cannot turn to the right direction."""
    return trust_coefficient * sum(lrs) / (1.0 - momentum)


# --------------------------------------------------------------------------------------------
# Optimizer factory
# --------------------------------------------------------------------------------------------


def build_optimizer(
    name: OptimizerName,
    groups: list[dict],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Optimizer over `param_groups(...)` output; each group starts at lr · lr_scale.

    adamw: weight decay per group; `fused=None` picks torch's fused kernel (CUDA and, since torch 2.4, CPU),
    `fused=False` its multi-tensor foreach loop. lars: the linear-probe optimizer above.
    sgd: plain momentum SGD.
    `betas` is used by adamw only, `momentum` by lars and sgd.
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not groups or not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: every parameter is frozen or the groups are empty")
    groups = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    if name == "adamw":
        # Fused kernels exist for CUDA and (torch >= 2.4) CPU; on CPU fused measured 3.3x faster than the loop.
        use_fused = True if fused is None else fused
        # foreach stays at torch's default (None): the multi-tensor kernel wherever it is supported.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=use_fused)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be one of 'adamw', 'lars', 'sgd'; got {name!r}")


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------


def lr_at(
    step: float,
    *,
    base_lr: float,
    warmup_steps: float,
    total_steps: float,
    min_lr: float = 0.0,
    schedule: Literal["cosine", "constant"] = "cosine",
) -> float:
    """lr at iteration `step` (may be fractional): linear warm-up from 0 to base_lr over warmup_steps,
    then half-cycle cosine from base_lr down to min_lr at total_steps (held there afterwards), or
    base_lr held constant. Called every iteration, as MAE's `adjust_learning_rate`.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr · lr_scale (lr_scale carries the layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

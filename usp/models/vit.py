"""The transformer parts every `usp` model shares, and the ViT classifier on latents.

Key names follow timm / MAE (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `blocks.{i}.mlp.fc1`, ...)
so public checkpoints load without renaming.

Position embeddings are the fixed 2-D sin-cos table of MAE: the first half of the channels encodes
the row (h) coordinate, the second half the column (w) coordinate, each as [sin | cos].
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions: (M,) float -> (M, dim) as [sin(p·ω) | cos(p·ω)], ω_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position table: (grid_h*grid_w [+1], dim), row-major, cls slot zero.

    Matches MAE's `get_2d_sincos_pos_embed` numerically (float64 maths, returned as float32).
    """
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    # MAE meshgrids (w, h) and encodes grid[0] (= the column index) in the first half.
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (H*W, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def resize_pos_embed(
    pos_embed: torch.Tensor, new_grid: int | tuple[int, int], num_prefix_tokens: int = 0, mode: str = "bicubic"
) -> torch.Tensor:
    """Resize a (1, prefix + H*W, D) position table to a new square-or-rectangular grid.

    Prefix tokens (cls) are kept as they are; the grid part is interpolated in 2-D (`mode`:
    bicubic or bilinear, align_corners=False as timm and DeiT do).
    """
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position table with {grid.shape[1]} grid tokens is not a square grid")
    if (old, old) == (new_h, new_w):
        return pos_embed.clone()
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, L, p*p*C), patch vectors ordered (p_row, p_col, channel) as MAE/DiT."""
    n, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """x: (N, L, p*p*C) -> (N, C, H, W); inverse of `patchify` for a square grid."""
    n, length, _ = x.shape
    p, side = patch_size, int(math.isqrt(x.shape[1]))
    if side * side != length:
        raise ValueError(f"{length} tokens do not form a square grid")
    x = x.reshape(n, side, side, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, side * p, side * p)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, D) by a stride-p convolution (`proj`, as timm names it)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; uses PyTorch's fused SDPA kernels."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, approximate_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        # MAE/ViT use exact GELU; DiT uses the tanh approximation.
        self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """MAE / JAX-ViT initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(patch_embed: PatchEmbed) -> None:
    """Initialise the patch projection like a linear layer (MAE does so instead of conv init)."""
    weight = patch_embed.proj.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.zeros_(patch_embed.proj.bias)


# --------------------------------------------------------------------------------------------
# ViT classifier on latents (the understanding half of USP)
# --------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT on VAE latents with MAE/timm key names.

    global_pool=True: mean of patch tokens -> `fc_norm` -> `head` (MAE fine-tune default, no `norm`);
    global_pool=False: `norm` -> cls token -> `head`.
    """

    def __init__(
        self,
        latent_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        global_pool: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.latent_size, self.patch_size, self.in_channels = latent_size, patch_size, in_channels
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        grid = latent_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, cls_token=True).unsqueeze(0), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # plain floats, also under meta
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates])
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights)
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tune head init

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents -> (N, D) pooled features, before the head."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (N, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1+L, D)
        for block in self.blocks:
            x = block(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (N, num_classes)

"""LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation", arXiv 2501.01423): DiT with modern parts.

What differs from DiT/SiT (usp.models.dit), each switchable as in the official configs:
- use_rmsnorm: learnable RMSNorm (eps 1e-6, computed in float32) for norm1/norm2, the final norm and qk-norm;
- use_swiglu: SwiGLU feed-forward `w3(silu(a) · b)` with [a | b] = w12(x), hidden width int(2/3 · 4·D);
- use_rope: 2-D rotary position embedding on q and k (EVA-02's `VisionRotaryEmbeddingFast`), **rows in the first
  half of each head, columns in the second**, channels rotated in adjacent pairs (2i, 2i+1); the fixed sin-cos
  table is still added to the patch tokens, as the official model does;
- use_qknorm: a norm over each head's q and k (RMSNorm, or an affine LayerNorm with eps 1e-5 without use_rmsnorm);
- wo_shift: adaLN without the shift terms (4·D modulation instead of 6·D).
No learned sigma by default (velocity only). Key names are the official `models/lightningdit.py` ones
(`x_embedder.proj`, `feat_rope.freqs_cos`, `blocks.{i}.mlp.w12`, `blocks.{i}.attn.q_norm`, ...), so an official
checkpoint loads with strict=True into `create_model("lightningdit_xl_1", in_channels=32, input_size=16)`.

The encoder block of USP pretraining in this network's shape (`EncoderBlock`, no adaLN) has the same parameter
names, so its weights transfer block for block (usp.models.transfer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from usp.models.dit import DiT, LabelEmbedder, TimestepEmbedder
from usp.models.vit import LAYER_NORM_EPS, Mlp, PatchEmbed, sincos_2d

RMS_NORM_EPS = 1e-6  # official models/rmsnorm.py default
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim, the norm in float32 (LLaMA's RMSNorm, as LightningDiT)."""

    def __init__(self, dim: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def norm_layer(dim: int, use_rmsnorm: bool, affine: bool = False) -> nn.Module:
    """The block norms: RMSNorm (always learnable), or LayerNorm (eps 1e-6; affine only where asked)."""
    if use_rmsnorm:
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=LAYER_NORM_EPS)


# --------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, grid: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (grid·grid, head_dim) for tokens in row-major order (token r·grid + c).

    Channels [0, head_dim/2) rotate by the row r, [head_dim/2, head_dim) by the column c; within each half the
    pair (2i, 2i+1) turns by pos·ω_i, ω_i = theta^(−4i/head_dim) (EVA-02 with dim = head_dim/2). Positions are
    computed as arange(n)/n·n, float32, as the official table is, so the numbers match it bit for bit.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (head_dim/4,)
    pos = torch.arange(grid) / grid * grid  # (grid,) float32
    angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, half): pairs share an angle
    rows = angles[:, None, :].expand(grid, grid, half)  # (grid_r, grid_c, half), indexed by the row
    cols = angles[None, :, :].expand(grid, grid, half)  # indexed by the column
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., 2k) -> (..., 2k): each pair (a, b) -> (−b, a), i.e. multiplication by i of a + ib."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, L, head_dim); cos/sin: (L, head_dim) or (N, L, head_dim) per sample (kept tokens)."""
    if cos.ndim == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, L, head_dim)
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)  # the tables are float32


class VisionRoPE(nn.Module):
    """The fixed RoPE tables as buffers `freqs_cos` / `freqs_sin`: (grid², head_dim). Persistent, because the
    official checkpoints store them (`feat_rope.freqs_cos`)."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def tables(self, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All positions (L, head_dim), or the kept ones (N, L_keep, head_dim) for keep: (N, L_keep) indices."""
        if keep is None:
            return self.freqs_cos, self.freqs_sin
        return self.freqs_cos[keep], self.freqs_sin[keep]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class RopeAttention(nn.Module):
    """Self-attention with optional per-head qk-norm and RoPE (keys `qkv`, `q_norm`, `k_norm`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        # qk-norm: RMSNorm, or timm's default LayerNorm (affine, eps 1e-5) as the official Attention builds it.
        qk_norm = (lambda: RMSNorm(self.head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = qk_norm() if use_qknorm else nn.Identity()
        self.k_norm = qk_norm() if use_qknorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, L, D); rope: (cos, sin) for these L tokens, or None."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)  # each (N, heads, L, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim)
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class SwiGLU(nn.Module):
    """w3(silu(a) · b), [a | b] = w12(x): (N, L, D) -> (N, L, D) (DINOv2's SwiGLUFFN keys)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def feed_forward(dim: int, mlp_ratio: float, use_swiglu: bool) -> nn.Module:
    hidden = int(dim * mlp_ratio)
    # SwiGLU keeps the parameter count of the 4·D GELU MLP: hidden int(2/3 · 4·D) (official int(2/3 * mlp_hidden)).
    return SwiGLU(dim, int(2 / 3 * hidden)) if use_swiglu else Mlp(dim, hidden, approximate_gelu=True)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block with LightningDiT's parts: x + g·attn(mod(norm1(x)), rope), x + g·ffn(mod(norm2(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False):
        super().__init__()
        self.norm1 = norm_layer(hidden_size, use_rmsnorm)
        self.attn = RopeAttention(hidden_size, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = norm_layer(hidden_size, use_rmsnorm)
        self.mlp = feed_forward(hidden_size, mlp_ratio, use_swiglu)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, L, D), c: (N, D) -> (N, L, D)."""
        mod = self.adaLN_modulation(c)  # (N, 4D or 6D)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=-1)
            shift_msa = shift_mlp = 0.0
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope)  # (N, L, D)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)  # (N, L, D)


class EncoderBlock(nn.Module):
    """The same parts without adaLN, for USP pretraining: x + attn(norm1(x), rope), x + ffn(norm2(x)).

    Its LayerNorms (without use_rmsnorm) are affine, as a ViT's, so that they have weights to hand over."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim, use_rmsnorm, affine=True)
        self.attn = RopeAttention(dim, num_heads, use_qknorm, use_rmsnorm)
        self.norm2 = norm_layer(dim, use_rmsnorm, affine=True)
        self.mlp = feed_forward(dim, mlp_ratio, use_swiglu)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class LightningFinalLayer(nn.Module):
    """(N, L, D) -> (N, L, p·p·C_out): modulated norm (RMSNorm or plain LayerNorm), then a linear map."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        self.norm_final = norm_layer(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class LightningDiT(DiT):
    """Class-conditional LightningDiT on (N, C, H, W) latents; DiT's interface (forward, forward_with_cfg, ...).

    Defaults are the official 64/800-epoch VA-VAE configs (configs/lightningdit_xl_vavae_f16d32.yaml): SwiGLU,
    RoPE and RMSNorm on, qk-norm and wo_shift off, no learned sigma.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        output_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
    ):
        nn.Module.__init__(self)  # DiT's parts are built here, not by DiT.__init__
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.affine_norms = use_rmsnorm  # learnable block norms (RMSNorm weights), as DiT's flag means
        self.learn_sigma, self.output_sigma = learn_sigma, output_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid_size = input_size // patch_size
        self.options = dict(use_qknorm=use_qknorm, use_swiglu=use_swiglu, use_rope=use_rope,
                            use_rmsnorm=use_rmsnorm, wo_shift=wo_shift)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid_size).unsqueeze(0), requires_grad=False)
        self.feat_rope = VisionRoPE(hidden_size // num_heads, self.grid_size) if use_rope else None
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)])
        self.final_layer = LightningFinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()  # DiT's: xavier linears, zeroed adaLN and output (RMSNorm weights stay 1)

    def run_block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return block(x, c, None if self.feat_rope is None else self.feat_rope.tables())

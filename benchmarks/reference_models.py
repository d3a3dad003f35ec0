"""Naive eager references of usp's pretraining MAE and DiT, for `python benchmarks/run.py` to time usp against.

Each reference computes the same function as the usp model it is built from (`NaiveMAE.from_usp`,
`NaiveDiT.from_usp` copy the weights), written the way a first implementation would be: separate
q / k / v projections, attention as an explicit softmax of a materialised score matrix, LayerNorm and
GELU spelt out as elementwise maths, linears as `x @ W.T + b`, patches cut by reshapes. No fused kernel
(SDPA, addmm, native layer norm, fused GELU) is used, so the ratio usp / reference in the benchmark tables
measures what usp's choice of kernels buys. Parameter counts equal usp's: the fused qkv matrix is split
into three, nothing is added or dropped.

The baselines of the switch and metric tables live here too: attention spelt out inside usp's own Attention
module, a torch Inception Score, and a candidate Fréchet distance (Cholesky + eigenvalues only).

Shapes follow usp (docs/conventions.md): latents (N, C, H, W), masks (N, L) with 1 = masked, patch
vectors ordered (row-in-patch, column-in-patch, channel).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from usp.models.dit import DiT
from usp.models.mae import MaskedLatentAutoencoder


def _param(tensor: torch.Tensor, trainable: bool = True) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=trainable)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x @ weight.t() + bias  # a matmul and a separate add: no addmm


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def gelu(x: torch.Tensor, approximate: bool) -> torch.Tensor:
    if approximate:  # tanh form, as DiT's MLP
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def patches_cpp(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, C·p·p) in the (channel, row, column) order of a conv kernel's flattening."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def patches_ppc(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p·p·C) in usp's patch order (row, column, channel)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


class NaiveBlock(nn.Module):
    """Pre-norm transformer block; optional adaLN modulation (DiT) when `adaln` is True."""

    def __init__(self, block: nn.Module, adaln: bool):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        dim = attn.proj.weight.shape[0]
        self.num_heads, self.eps, self.adaln = attn.num_heads, block.norm1.eps, adaln
        self.approximate = mlp.act.approximate == "tanh"
        q_w, k_w, v_w = attn.qkv.weight.split(dim, dim=0)
        q_b, k_b, v_b = attn.qkv.bias.split(dim, dim=0)
        self.q_w, self.k_w, self.v_w = _param(q_w), _param(k_w), _param(v_w)
        self.q_b, self.k_b, self.v_b = _param(q_b), _param(k_b), _param(v_b)
        self.proj_w, self.proj_b = _param(attn.proj.weight), _param(attn.proj.bias)
        self.fc1_w, self.fc1_b = _param(mlp.fc1.weight), _param(mlp.fc1.bias)
        self.fc2_w, self.fc2_b = _param(mlp.fc2.weight), _param(mlp.fc2.bias)
        self.has_affine = block.norm1.weight is not None
        if self.has_affine:
            self.n1_w, self.n1_b = _param(block.norm1.weight), _param(block.norm1.bias)
            self.n2_w, self.n2_b = _param(block.norm2.weight), _param(block.norm2.bias)
        if adaln:
            self.ada_w, self.ada_b = _param(block.adaLN_modulation[1].weight), _param(block.adaLN_modulation[1].bias)

    def norm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if not self.has_affine:
            return layer_norm(x, None, None, self.eps)
        return layer_norm(x, *((self.n1_w, self.n1_b) if which == 1 else (self.n2_w, self.n2_b)), self.eps)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, heads, head_dim).transpose(1, 2)  # (N, heads, L, head_dim)

        q, k, v = (split(linear(x, w, b)) for w, b in ((self.q_w, self.q_b), (self.k_w, self.k_b),
                                                          (self.v_w, self.v_b)))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (N, heads, L, L), materialised
        scores = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        probs = scores / scores.sum(dim=-1, keepdim=True)
        out = (probs @ v).transpose(1, 2).reshape(n, length, dim)
        return linear(out, self.proj_w, self.proj_b)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return linear(gelu(linear(x, self.fc1_w, self.fc1_b), self.approximate), self.fc2_w, self.fc2_b)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.adaln:
            x = x + self.attention(self.norm(x, 1))
            return x + self.mlp(self.norm(x, 2))
        mod = linear(c * torch.sigmoid(c), self.ada_w, self.ada_b)  # SiLU spelt out
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in mod.chunk(6, dim=1))
        x = x + gate1 * self.attention(self.norm(x, 1) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm(x, 2) * (1 + scale2) + shift2)


class NaiveMAE(nn.Module):
    """usp's MaskedLatentAutoencoder, naively. `forward(x, mask_ratio, noise)` -> loss (scalar)."""

    def __init__(self, model: MaskedLatentAutoencoder):
        super().__init__()
        self.p, self.channels, self.norm_pix = model.patch_size, model.in_channels, model.norm_pix_loss
        self.eps = model.norm.eps
        conv = model.patch_embed.proj
        self.embed_w, self.embed_b = _param(conv.weight.reshape(conv.weight.shape[0], -1)), _param(conv.bias)
        self.cls_token, self.mask_token = _param(model.cls_token), _param(model.mask_token)
        self.pos_embed = _param(model.pos_embed, trainable=False)
        self.decoder_pos_embed = _param(model.decoder_pos_embed, trainable=False)
        self.blocks = nn.ModuleList([NaiveBlock(b, adaln=False) for b in model.blocks])
        self.norm_w, self.norm_b = _param(model.norm.weight), _param(model.norm.bias)
        self.dec_embed_w, self.dec_embed_b = _param(model.decoder_embed.weight), _param(model.decoder_embed.bias)
        self.decoder_blocks = nn.ModuleList([NaiveBlock(b, adaln=False) for b in model.decoder_blocks])
        self.dec_norm_w, self.dec_norm_b = _param(model.decoder_norm.weight), _param(model.decoder_norm.bias)
        self.pred_w, self.pred_b = _param(model.decoder_pred.weight), _param(model.decoder_pred.bias)

    @classmethod
    def from_usp(cls, model: MaskedLatentAutoencoder) -> NaiveMAE:
        return cls(model)

    def forward(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents, noise: (N, L) in [0, 1) choosing the mask as usp does -> scalar loss."""
        n = x.shape[0]
        tokens = linear(patches_cpp(x, self.p), self.embed_w, self.embed_b) + self.pos_embed[:, 1:]  # (N, L, D)
        length = tokens.shape[1]
        keep = int(length * (1 - mask_ratio))
        order = torch.argsort(noise, dim=1)  # smallest noise kept, as MAE
        restore = torch.argsort(order, dim=1)
        rows = torch.arange(n, device=x.device)[:, None]
        visible = tokens[rows, order[:, :keep]]  # (N, keep, D), advanced indexing instead of gather
        mask = (restore >= keep).to(x.dtype)  # (N, L), 1 = masked
        h = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), visible], dim=1)
        for block in self.blocks:
            h = block(h)
        h = layer_norm(h, self.norm_w, self.norm_b, self.eps)
        h = linear(h, self.dec_embed_w, self.dec_embed_b)  # (N, 1+keep, D_dec)
        filled = torch.cat([h[:, 1:], self.mask_token.expand(n, length - keep, -1)], dim=1)  # shuffled order
        h = torch.cat([h[:, :1], filled[rows, restore]], dim=1) + self.decoder_pos_embed  # (N, 1+L, D_dec)
        for block in self.decoder_blocks:
            h = block(h)
        pred = linear(layer_norm(h, self.dec_norm_w, self.dec_norm_b, self.eps), self.pred_w, self.pred_b)[:, 1:]
        target = patches_ppc(x, self.p)
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = ((target - mean) ** 2).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased, as MAE
            target = (target - mean) / torch.sqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()


class NaiveDiT(nn.Module):
    """usp's DiT, naively. `forward(x, t, y)` -> (N, C_ret, H, W), label dropout drawn as usp draws it."""

    def __init__(self, model: DiT):
        super().__init__()
        self.p, self.out_channels, self.returned = model.patch_size, model.out_channels, model.num_output_channels
        self.eps = model.final_layer.norm_final.eps
        self.freq_dim = model.t_embedder.frequency_embedding_size
        self.num_classes, self.dropout_prob = model.y_embedder.num_classes, model.y_embedder.dropout_prob
        conv = model.x_embedder.proj
        self.embed_w, self.embed_b = _param(conv.weight.reshape(conv.weight.shape[0], -1)), _param(conv.bias)
        t_mlp = model.t_embedder.mlp
        self.t1_w, self.t1_b, self.t2_w, self.t2_b = (_param(t) for t in (t_mlp[0].weight, t_mlp[0].bias,
                                                                          t_mlp[2].weight, t_mlp[2].bias))
        self.label_table = _param(model.y_embedder.embedding_table.weight)
        self.pos_embed = _param(model.pos_embed, trainable=False)
        self.blocks = nn.ModuleList([NaiveBlock(b, adaln=True) for b in model.blocks])
        final = model.final_layer
        ada = final.adaLN_modulation[1]
        self.final_ada_w, self.final_ada_b = _param(ada.weight), _param(ada.bias)
        self.final_w, self.final_b = _param(final.linear.weight), _param(final.linear.bias)

    @classmethod
    def from_usp(cls, model: DiT) -> NaiveDiT:
        return cls(model)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        tokens = linear(patches_cpp(x, self.p), self.embed_w, self.embed_b) + self.pos_embed  # (N, L, D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        t_emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 256), cos first as DiT
        t_emb = linear(t_emb, self.t1_w, self.t1_b)
        t_emb = linear(t_emb * torch.sigmoid(t_emb), self.t2_w, self.t2_b)
        if self.training and self.dropout_prob > 0:  # same single draw as usp's LabelEmbedder.token_drop
            drop = torch.rand(n, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        c = t_emb + self.label_table[y]  # (N, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = linear(c * torch.sigmoid(c), self.final_ada_w, self.final_ada_b).chunk(2, dim=1)
        out = layer_norm(tokens, None, None, self.eps) * (1 + scale[:, None]) + shift[:, None]
        out = linear(out, self.final_w, self.final_b)  # (N, L, p·p·C_out)
        p, c_out, side = self.p, self.out_channels, h // self.p
        out = out.reshape(n, side, side, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(n, c_out, h, w)
        return out[:, : self.returned]


# --------------------------------------------------------------------------------------------
# Baselines of the switch and metric tables
# --------------------------------------------------------------------------------------------


def explicit_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """usp's Attention with softmax(QKᵀ/√d)V spelt out instead of scaled_dot_product_attention."""
    n, length, dim = x.shape
    qkv = attn.qkv(x).reshape(n, length, 3, attn.num_heads, dim // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.proj((probs @ v).transpose(1, 2).reshape(n, length, dim))


def inception_score(logits: np.ndarray, split_size: int) -> float:
    """IS of (N, C) logits: mean over splits of exp(E KL(p(y|x) ‖ p(y))), with torch's float64 softmax."""
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = torch.log_softmax(torch.from_numpy(logits[i : i + split_size]).double(), dim=1)
        p = log_p.exp()
        kl = (p * (log_p - p.mean(0, keepdim=True).log())).sum(1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))


def frechet_from_eigenvalues(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance with tr((Σ1 Σ2)^½) = Σ √λ(Lᵀ Σ2 L), Σ1 = L Lᵀ: Σ1 Σ2 and the symmetric Lᵀ Σ2 L share
    their eigenvalues, so one Cholesky factor and one eigenvalue-only symmetric solve replace sqrtm (and the
    eigenvector solve that forming Σ1^½ needs). Exact for positive-definite Σ1."""
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    chol = np.linalg.cholesky(s1)
    inner = chol.T @ s2 @ chol
    eigenvalues = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eigenvalues).sum())

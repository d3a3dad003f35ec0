"""DiT / SiT backbone: a transformer over latent patches conditioned on time and class by adaLN-Zero.

One class serves both papers: DiT (Peebles & Xie, 2023) and SiT (Ma et al., 2024) share the network and
differ only in what `forward` returns (see `output_sigma`). Key names and shapes match the public DiT/SiT
checkpoints, so the weights of `DiT-XL-2-256x256.pt` / `SiT-XL-2-256.pt` load with `strict=True` into
`create_model("dit_xl_2")` / `create_model("sit_xl_2")` (after unwrapping, see `usp.models.transfer`).

`affine_norms=True` gives USP's "VAE-simple" block: norm1/norm2 are affine LayerNorms so that the
LayerNorm weights of the pretrained encoder have somewhere to go (`usp.models.transfer`). The adaLN
modulation then acts on top of them: LN(x)·γ + β, then ·(1 + scale) + shift.

The time argument is whatever the diffusion/transport module feeds in (see docs/conventions.md):
integer DDPM indices for DiT, t ∈ [0, 1] for SiT; the embedding treats both as real numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from usp.models.vit import LAYER_NORM_EPS, Attention, Mlp, PatchEmbed, init_patch_embed, init_vit_weights, sincos_2d
from usp.models.vit import unpatchify as unpatchify_tokens


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (N, L, D), shift/scale: (N, D) -> x·(1 + scale) + shift, so zero modulation is the identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t: (N,) -> (N, D): 256 sinusoidal features -> Linear -> SiLU -> Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t: (N,) real -> (N, dim) as [cos(t·f_k) | sin(t·f_k)], f_k = max_period^(-k/half), k < half.

        The cos-first order and float32 maths follow DiT (from GLIDE) so public checkpoints see the inputs
        they were trained on; an odd `dim` gets one zero column at the end.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """y: (N,) long -> (N, D), with label dropout for classifier-free guidance.

    With dropout_prob > 0 the table has one extra row, index `num_classes`, the null ("unconditional")
    label that a dropped label is replaced by and that CFG sampling asks for.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"class dropout probability must lie in [0, 1], got {dropout_prob}")
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def null_label(self) -> int:
        if self.dropout_prob == 0:
            raise ValueError("this label embedder has no null label (class_dropout_prob=0): CFG is unavailable")
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null label; force_drop_ids: (N,), 1 = drop (deterministic)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by c, each branch gated (adaLN-Zero, DiT §3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, affine_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=affine_norm, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate_gelu=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, L, D) tokens, c: (N, D) condition -> (N, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, L, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D)


class FinalLayer(nn.Module):
    """(N, L, D) -> (N, L, p·p·C_out): modulated non-affine LayerNorm, then a linear map to patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, L, p*p*C_out)


class DiT(nn.Module):
    """Class-conditional diffusion transformer on (N, C, H, W) latents.

    learn_sigma: the network predicts a variance channel per input channel too (out_channels = 2·C), as the
        public DiT and SiT checkpoints were trained.
    output_sigma: whether `forward` returns those variance channels. DiT's learned-sigma loss needs them
        (True); SiT's transport objectives use only the first C channels, and SiT's own forward drops the
        rest (False). Ignored when learn_sigma is False.
    affine_norms: False = the public DiT/SiT block; True = USP's VAE-simple block (affine norm1/norm2).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        affine_norms: bool = False,
        output_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.affine_norms = hidden_size, num_heads, affine_norms
        self.learn_sigma, self.output_sigma = learn_sigma, output_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid_size = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A fixed table, but a Parameter (requires_grad=False) because the public checkpoints store it as one.
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid_size).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, affine_norm=affine_norms) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; the zeroed adaLN and output layers make every block start as the identity."""
        self.apply(init_vit_weights)  # xavier-uniform linears, zero biases, unit affine LayerNorms
        init_patch_embed(self.x_embedder)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def null_label(self) -> int:
        """The label to pass for the unconditional half of a CFG batch."""
        return self.y_embedder.null_label

    @property
    def num_output_channels(self) -> int:
        """Channels `forward` returns: out_channels, or only the first in_channels when not output_sigma."""
        return self.out_channels if self.output_sigma else self.in_channels

    def run_block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One block on (N, L, D) tokens; LightningDiT overrides it to hand its blocks the RoPE tables."""
        return block(x, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                return_hidden: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) latents, t: (N,) time (int or float), y: (N,) long labels -> (N, C_ret, H, W).

        return_hidden=k: also return the tokens (N, L, D) after block k (1-based), as REPA aligns them."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"this model was built for {self.input_size}x{self.input_size} latents, "
                             f"got {tuple(x.shape[-2:])}")
        if return_hidden is not None and not 1 <= return_hidden <= self.depth:
            raise ValueError(f"return_hidden={return_hidden} must name a block 1..{self.depth}")
        x = self.x_embedder(x) + self.pos_embed  # (N, L, D), L = (H/p)·(W/p)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        hidden = None
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, c)  # (N, L, D)
            if i + 1 == return_hidden:
                hidden = x
        x = self.final_layer(x, c)  # (N, L, p*p*C_out)
        x = unpatchify_tokens(x, self.patch_size, self.out_channels)  # (N, C_out, H, W)
        out = x[:, : self.num_output_channels]  # (N, C_ret, H, W)
        return out if return_hidden is None else (out, hidden)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch: rows [:N/2] are conditional, rows [N/2:] carry the null label.

        Only x[:N/2] is used (duplicated), so both halves see the same latents. On the first
        `guided_channels` channels both halves get u + s·(c − u); the other channels are returned as
        each half computed them. The public DiT/SiT samplers guide 3 of 4 latent channels (default 3, for
        exact reproduction of their numbers); None guides every returned channel (standard CFG).
        """
        if x.shape[0] % 2:
            raise ValueError(f"a CFG batch holds a conditional and an unconditional half; got odd size {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (N, C_ret, H, W)
        g = out.shape[1] if guided_channels is None else guided_channels
        if not 0 < g <= out.shape[1]:
            raise ValueError(f"guided_channels must lie in [1, {out.shape[1]}] or be None, got {guided_channels}")
        guided, rest = out[:, :g], out[:, g:]
        cond, uncond = guided.chunk(2, dim=0)  # each (N/2, g, H, W)
        mixed = uncond + cfg_scale * (cond - uncond)  # CFG, Ho & Salimans (2022) eq. 6
        return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)  # (N, C_ret, H, W)

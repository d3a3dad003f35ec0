"""USP pretraining model: masked latent modeling (MAE on VAE latents).

The encoder sees the visible 1 − mask_ratio of the latent patches (plus a cls token); a light
decoder fills in mask tokens and predicts every patch; the loss is the MSE on masked patches only,
against per-patch normalised targets (MAE's norm-pix loss). State-dict keys are those of the
official MAE / USP checkpoints, so they load with `strict=True`.

`block_options` builds the encoder from LightningDiT's parts instead (usp.models.lightningdit.EncoderBlock: RMSNorm,
SwiGLU, 2-D RoPE, qk-norm, as `use_*` keys), so that its blocks transfer one for one into a LightningDiT. RoPE then
rotates each kept token by its own grid position (the tables are gathered by the kept indices), and the cls token
by none (identity rotation), as EVA-02 leaves its cls token unrotated. The decoder stays MAE's (it is discarded).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from usp.models.lightningdit import EncoderBlock, RMSNorm, VisionRoPE
from usp.models.vit import (
    LAYER_NORM_EPS,
    Block,
    PatchEmbed,
    init_patch_embed,
    init_vit_weights,
    patchify,
    sincos_2d,
    unpatchify,
)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample, by sorting per-sample noise (MAE).

    x: (N, L, D) tokens; noise: (N, L) in [0, 1), pass it to make the mask reproducible.
    Returns x_visible (N, L_keep, D) with L_keep = int(L·(1−mask_ratio)), mask (N, L) with
    1 = masked, and ids_restore (N, L) that puts the shuffled sequence back in order.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # small noise = kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # (N, L_keep, D)
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original order
    return x_visible, mask, ids_restore


def normalized_patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """patches: (N, L, P) -> each patch vector minus its mean over P, over sqrt(unbiased var + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE
    return (patches - mean) / (var + eps) ** 0.5


class MaskedLatentAutoencoder(nn.Module):
    def __init__(
        self,
        latent_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        block_options: dict[str, bool] | None = None,
    ):
        super().__init__()
        if latent_size % patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by the patch size {patch_size}")
        self.latent_size, self.in_channels, self.patch_size = latent_size, in_channels, patch_size
        self.norm_pix_loss = norm_pix_loss
        grid = latent_size // patch_size
        self.num_patches = grid * grid

        # Encoder (the part that is transferred to DiT / SiT / ViT).
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, cls_token=True)[None], requires_grad=False)
        self.block_options = dict(block_options or {})
        if block_options is None:
            self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
            self.rope = None
        else:
            options = {k: v for k, v in self.block_options.items() if k != "use_rope"}
            self.blocks = nn.ModuleList([EncoderBlock(embed_dim, num_heads, mlp_ratio, **options)
                                         for _ in range(depth)])
            self.rope = VisionRoPE(embed_dim // num_heads, grid) if self.block_options.get("use_rope") else None
        rms = self.block_options.get("use_rmsnorm", False)
        self.norm = RMSNorm(embed_dim) if rms else nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

        # Light decoder (discarded after pretraining).
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, grid, cls_token=True)[None], requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_channels)

        self.apply(init_vit_weights)
        init_patch_embed(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) latents -> encoded (N, 1+L_keep, D), mask (N, L), ids_restore (N, L)."""
        if x.shape[-1] != self.latent_size or x.shape[-2] != self.latent_size:
            raise ValueError(
                f"latents of size {tuple(x.shape[-2:])} given to a model built for {self.latent_size}x"
                f"{self.latent_size}; set the recipe's image size so that image_size / VAE factor matches"
            )
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (N, L, D)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (N, L_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1+L_keep, D)
        rope = None if self.rope is None else self.kept_rope(ids_restore, x.shape[1] - 1)
        for block in self.blocks:
            x = block(x) if isinstance(block, Block) else block(x, rope)
        return self.norm(x), mask, ids_restore

    def kept_rope(self, ids_restore: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of [cls, kept tokens]: (N, 1+L_keep, head_dim) each; the cls row is the identity rotation.

        The kept tokens are the first len_keep of the shuffle that ids_restore undoes (random_masking's order)."""
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :len_keep]  # (N, L_keep) grid positions
        cos, sin = self.rope.tables(ids_keep)  # each (N, L_keep, head_dim)
        return torch.cat([torch.ones_like(cos[:, :1]), cos], 1), torch.cat([torch.zeros_like(sin[:, :1]), sin], 1)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: (N, 1+L_keep, D) -> predicted patches (N, L, p*p*C) for every position."""
        x = self.decoder_embed(x)  # (N, 1+L_keep, D_dec)
        n, kept, dim = x.shape
        masked = self.mask_token.expand(n, ids_restore.shape[1] + 1 - kept, -1)
        tokens = torch.cat([x[:, 1:], masked], dim=1)  # (N, L, D_dec), shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # original order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed  # (N, 1+L, D_dec)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (N, L, p*p*C), cls dropped

    def loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target: (N, C, H, W) clean latents; pred: (N, L, P); mask: (N, L), 1 = masked.

        Mean over masked patches of the per-patch mean squared error.
        """
        patches = patchify(target, self.patch_size)  # (N, L, P)
        if self.norm_pix_loss:
            patches = normalized_patch_targets(patches)
        per_patch = ((pred.float() - patches.float()) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        x: torch.Tensor,
        mask_ratio: float = 0.75,
        target: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) latents (possibly noised); target: clean latents (default x).

        Returns loss (scalar), pred (N, L, P), mask (N, L).
        """
        encoded, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(encoded, ids_restore)
        return self.loss(x if target is None else target, pred, mask), pred, mask

    def reconstruct(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Paste predicted patches into the masked positions of x (the paper's restoration figure).

        With norm-pix targets the prediction is de-normalised with the true patch's mean and std,
        as MAE's visualisation does: the model never predicts those statistics.

        x: (N, C, H, W); pred: (N, L, P); mask: (N, L) -> (N, C, H, W).
        """
        patches = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        mixed = patches * (1 - mask.unsqueeze(-1)) + pred * mask.unsqueeze(-1)
        return unpatchify(mixed, self.patch_size, self.in_channels)


# Decoder sizes (the encoder sizes are the registry's table in `usp.models`): 512 wide × 8 blocks × 16 heads
# throughout, as in MAE / USP; a small one for the CPU-sized "t" encoder.
PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
SMALL_DECODER = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=2)

"""Model FLOPs per training sample, from a model's sizes, and model FLOP utilisation (MFU) against a device table.

Counted analytically, per image (the convention of PaLM's MFU and of nanoGPT's `estimate_mfu`):

    forward = Σ_linear 2 · weight_elements · tokens_through_it  +  Σ_layers 4 · T² · D
    step    = 3 · forward          (backward ≈ 2 × forward)

A block's linears are qkv, proj, fc1, fc2 (12 D² for MLP ratio 4) on its T tokens; 4 T² D is QKᵀ plus
attention·V. Biases, norms, softmax, embeddings and elementwise maths are not counted. The MAE encoder sees
cls + the visible int(L·(1 − mask_ratio)) patches, its decoder cls + all L; DiT's adaLN and timestep MLPs act on
one conditioning vector per image. Activation recomputation is not counted (MFU, not hardware utilisation).
"""

from __future__ import annotations

import torch

# Dense (no sparsity) tensor-core peaks in FLOP/s, from the vendors' data sheets (SXM parts; PCIe H100 is lower).
# fp32 means what an fp32 step runs at with TF32 matmuls allowed, as usp trains on GPUs.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


def block_flops(width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """One transformer block's forward on `tokens` tokens of one image: 2·(qkv+proj+fc1+fc2 weights)·T + 4·T²·D."""
    hidden = int(width * mlp_ratio)
    weights = 3 * width * width + width * width + 2 * width * hidden
    return 2.0 * weights * tokens + 4.0 * tokens**2 * width


def mae_forward_flops(*, latent_size: int, in_channels: int, patch_size: int, embed_dim: int, depth: int,
                      decoder_embed_dim: int, decoder_depth: int, mask_ratio: float, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one latent through the masked latent autoencoder (usp.models.mae)."""
    length = (latent_size // patch_size) ** 2
    patch = patch_size * patch_size * in_channels
    enc, dec = 1 + int(length * (1 - mask_ratio)), 1 + length  # cls + visible; cls + all
    flops = 2.0 * patch * embed_dim * length  # patch embedding sees every patch
    flops += depth * block_flops(embed_dim, enc, mlp_ratio)
    flops += 2.0 * embed_dim * decoder_embed_dim * enc
    flops += decoder_depth * block_flops(decoder_embed_dim, dec, mlp_ratio)
    return flops + 2.0 * decoder_embed_dim * patch * dec


def dit_forward_flops(*, input_size: int, in_channels: int, patch_size: int, hidden_size: int, depth: int,
                      out_channels: int, mlp_ratio: float = 4.0, frequency_embedding_size: int = 256) -> float:
    """Forward FLOPs of one latent through DiT / SiT (usp.models.dit); out_channels = 2·C with learned sigma."""
    length = (input_size // patch_size) ** 2
    d = hidden_size
    flops = 2.0 * patch_size * patch_size * in_channels * d * length
    flops += 2.0 * (frequency_embedding_size * d + d * d)  # timestep MLP, one vector
    flops += depth * (block_flops(d, length, mlp_ratio) + 2.0 * d * 6 * d)  # + adaLN on c
    return flops + 2.0 * d * patch_size * patch_size * out_channels * length + 2.0 * d * 2 * d


def _mlp_ratio(mlp: torch.nn.Module) -> float:
    """The GELU-MLP ratio with the same weights: fc1's, or for SwiGLU (w12: D -> 2H, w3: H -> D; 3·D·H weights,
    LightningDiT) 1.5·H / D."""
    if hasattr(mlp, "fc1"):
        return mlp.fc1.out_features / mlp.fc1.in_features
    return 1.5 * mlp.w3.in_features / mlp.w3.out_features


def training_flops_per_sample(model: torch.nn.Module, mask_ratio: float = 0.75) -> float:
    """3 × forward FLOPs of one sample through a usp MAE or DiT/SiT, read from the model's sizes."""
    from usp.models.dit import DiT
    from usp.models.mae import MaskedLatentAutoencoder

    if isinstance(model, MaskedLatentAutoencoder):
        block, dec = model.blocks[0], model.decoder_blocks
        return 3.0 * mae_forward_flops(
            latent_size=model.latent_size, in_channels=model.in_channels, patch_size=model.patch_size,
            embed_dim=model.patch_embed.proj.out_channels, depth=len(model.blocks),
            decoder_embed_dim=model.decoder_embed.out_features, decoder_depth=len(dec), mask_ratio=mask_ratio,
            mlp_ratio=_mlp_ratio(block.mlp))
    if isinstance(model, DiT):
        block = model.blocks[0]
        return 3.0 * dit_forward_flops(
            input_size=model.input_size, in_channels=model.in_channels, patch_size=model.patch_size,
            hidden_size=model.hidden_size, depth=model.depth, out_channels=model.out_channels,
            mlp_ratio=_mlp_ratio(block.mlp),
            frequency_embedding_size=model.t_embedder.frequency_embedding_size)
    raise TypeError(f"no FLOP count for {type(model).__name__}: only the MAE pretraining model and DiT/SiT")


def device_peak_flops(device: torch.device | str, precision: str) -> float | None:
    """The table's peak for this CUDA device and precision ('bf16', 'fp16', 'fp32'); None where unknown or CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for_name(torch.cuda.get_device_name(device), precision)


def peak_for_name(device_name: str, precision: str) -> float | None:
    """Look a device name such as 'NVIDIA H100 80GB HBM3' up in PEAK_FLOPS (first key contained in it)."""
    for key, peaks in PEAK_FLOPS.items():  # ordered so that 'H100 PCIe' is tried before 'H100'
        if all(part in device_name for part in key.split()):
            return peaks.get(precision)
    return None


def mfu(samples_per_second: float, flops_per_sample: float, peak_flops: float | None) -> float | None:
    """Model FLOP utilisation in [0, 1] (None without a peak): achieved model FLOP/s ÷ the device's peak."""
    if peak_flops is None or peak_flops <= 0:
        return None
    return samples_per_second * flops_per_sample / peak_flops

"""LDM-layout KL autoencoders (one `.ckpt`/`.pt` file, CompVis key names) loaded as a diffusers AutoencoderKL.

The KL-16 VAE that MAR and USP use and LightningDiT's VA-VAE are both the LDM `AutoencoderKL`: an encoder
`encoder.down.{level}.block.{i}` / `.attn.{i}` / `.downsample`, `encoder.mid.{block_1,attn_1,block_2}`, and
a decoder whose `decoder.up.{level}` is numbered from the *finest* level (diffusers numbers its up blocks from
the coarsest). An attention block follows every res-block of a level whose nominal resolution
(`resolution / 2**level`) is in `attn_resolutions`; diffusers expresses that as `AttnDownEncoderBlock2D` /
`AttnUpDecoderBlock2D` (single-head attention over the channels, the same maths as LDM's `AttnBlock`).

Loading is strict: every checkpoint key is either mapped to a diffusers key, or matches a prefix the layout
declares as training-only (losses, a frozen teacher, a projection head), or it is an error that names it;
a diffusers key left without a value is an error too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LdmLayout:
    """The `ddconfig` of an LDM AutoencoderKL, plus the checkpoint keys it carries but inference ignores."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    resolution: int
    encoder_attn: tuple[int, ...]  # nominal resolutions with attention after each res-block
    decoder_attn: tuple[int, ...]
    norm_groups: int = 32  # LDM's GroupNorm(32); tiny test layouts use fewer
    extra_prefixes: tuple[str, ...] = ()  # training-only keys to drop (never weights of the autoencoder)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def attention_levels(self, part: str) -> list[bool]:
        """Per level (finest first): does it hold attention blocks? (LDM's `curr_res in attn_resolutions`)."""
        wanted = self.encoder_attn if part == "encoder" else self.decoder_attn
        return [self.resolution // 2**level in wanted for level in range(len(self.ch_mult))]


# MAR's KL-16 (Li et al. 2024, models/vae.py): ch 128, ch_mult (1,1,2,2,4), 2 res-blocks, 16 latent channels;
# attention at 16 px in the encoder only. The checkpoint holds the autoencoder alone (under "model").
KL16_LAYOUT = LdmLayout(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, resolution=256,
                        encoder_attn=(16,), decoder_attn=())
# LightningDiT's VA-VAE f16d32 (Yao & Wang 2025, tokenizer/configs/vavae_f16d32.yaml): the same network with
# 32 latent channels and attention at 16 px in encoder and decoder. Its training checkpoint (under
# "state_dict") also holds the LPIPS/discriminator loss ("loss."), the frozen DINOv2 teacher
# ("foundation_model.") and the VF-loss projection ("linear_proj.", reverse_proj: 32 -> teacher width).
VAVAE_F16D32_LAYOUT = LdmLayout(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, resolution=256,
                                encoder_attn=(16,), decoder_attn=(16,),
                                extra_prefixes=("loss.", "foundation_model.", "linear_proj."))


def diffusers_config(layout: LdmLayout) -> dict:
    """The diffusers `AutoencoderKL` keyword arguments of an LDM layout."""
    down = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in layout.attention_levels("encoder")]
    # diffusers' up blocks run coarsest first: reverse the per-level attention flags.
    up = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in layout.attention_levels("decoder")[::-1]]
    return dict(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
                block_out_channels=[layout.ch * m for m in layout.ch_mult], layers_per_block=layout.num_res_blocks,
                latent_channels=layout.z_channels, norm_num_groups=layout.norm_groups, sample_size=layout.resolution)


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}


def _target(key: str, levels: int) -> tuple[str, bool] | None:
    """The diffusers name of one LDM key and whether it is an attention 1×1 conv (stored as a linear), or None."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key, False
    if part not in ("encoder", "decoder"):
        return None
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        kind, level, sub, index, name, tensor = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)  # LDM numbers up levels finest first
        table = _RESNET if sub == "block" else _ATTN
        if name not in table:
            return None
        group = "resnets" if sub == "block" else "attentions"
        return f"{part}.{kind}_blocks.{level}.{group}.{index}.{table[name]}.{tensor}", sub == "attn"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
    if m:
        kind, level, sampler, tensor = m.groups()
        level = int(level) if kind == "down" else levels - 1 - int(level)
        return f"{part}.{kind}_blocks.{level}.{sampler}rs.0.conv.{tensor}", False
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", rest)
    if m:
        block, name, tensor = m.groups()
        if block == "attn_1":
            return (f"{part}.mid_block.attentions.0.{_ATTN[name]}.{tensor}", True) if name in _ATTN else None
        index = 0 if block == "block_1" else 1
        return (f"{part}.mid_block.resnets.{index}.{_RESNET[name]}.{tensor}", False) if name in _RESNET else None
    m = re.fullmatch(r"(conv_in|norm_out|conv_out)\.(weight|bias)", rest)
    if m:
        return f"{part}.{_TOP[m.group(1)]}.{m.group(2)}", False
    return None


def convert_ldm_state(state: dict[str, torch.Tensor], layout: LdmLayout) -> dict[str, torch.Tensor]:
    """LDM-layout autoencoder weights -> diffusers AutoencoderKL keys. Declared training-only keys are dropped;
    any other key that is not part of the autoencoder is a ValueError naming it."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(layout.extra_prefixes):
            continue
        target = _target(key, len(layout.ch_mult))
        if target is None:
            unknown.append(key)
            continue
        name, is_attn = target
        # LDM's attention projections are 1×1 convolutions; diffusers keeps them as linear layers.
        out[name] = value.reshape(value.shape[:2]) if is_attn and value.ndim == 4 else value
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} checkpoint key(s) are not part of this LDM autoencoder nor declared "
                         f"training-only ({', '.join(layout.extra_prefixes) or 'none'}): {shown}; is this the "
                         "checkpoint of the chosen latent space?")
    return out


def vae_from_ldm_state(state: dict[str, torch.Tensor], layout: LdmLayout) -> nn.Module:
    """A diffusers AutoencoderKL holding `state` (LDM keys), loaded strictly. Meta tensors build a meta model
    (layout checks of full-size checkpoints without allocating them)."""
    from diffusers import AutoencoderKL

    converted = convert_ldm_state(state, layout)
    on_meta = any(v.is_meta for v in converted.values())
    with torch.device("meta") if on_meta else torch.device("cpu"):
        vae = AutoencoderKL(**diffusers_config(layout))
    wanted = vae.state_dict()
    missing = sorted(set(wanted) - set(converted))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weight(s) of the LDM autoencoder, e.g. "
                         f"{', '.join(missing[:5])}; it is not a complete checkpoint of this latent space")
    wrong = [f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
             if converted[k].shape != v.shape]
    if wrong:
        raise ValueError(f"checkpoint shapes differ from the latent space's architecture (checkpoint vs expected): "
                         f"{'; '.join(wrong[:3])}; is this the checkpoint of the chosen latent space?")
    vae.load_state_dict(converted, strict=True, assign=on_meta)
    return vae


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.ckpt`/`.pt`/`.safetensors` file, unwrapped from "state_dict" or "model"."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # a training checkpoint that pickles Python objects besides tensors
            raise ValueError(f"{path} holds Python objects besides tensors, which usp never unpickles (a pickle can "
                             "run code); where you trust the file, re-save only its state_dict as .safetensors and "
                             "set latent.path to that file") from err
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_ldm_checkpoint(path: str | Path, layout: LdmLayout) -> nn.Module:
    return vae_from_ldm_state(read_checkpoint(Path(path)), layout)


def ldm_key_shapes(layout: LdmLayout) -> dict[str, tuple[int, ...]]:
    """Every key of an LDM AutoencoderKL (encoder, decoder, quant convs) and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def resnet(prefix: str, cin: int, cout: int) -> None:
        shapes.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                       f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
                       f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
                       f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)})
        if cin != cout:
            shapes.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})

    def attn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
        for name in ("q", "k", "v", "proj_out"):
            shapes.update({f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)})

    ch, mult, z, n = layout.ch, layout.ch_mult, layout.z_channels, len(layout.ch_mult)
    shapes.update({"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)})
    cin, res = ch, layout.resolution
    for level in range(n):
        for i in range(layout.num_res_blocks):
            resnet(f"encoder.down.{level}.block.{i}", cin, ch * mult[level])
            cin = ch * mult[level]
            if res in layout.encoder_attn:
                attn(f"encoder.down.{level}.attn.{i}", cin)
        if level != n - 1:
            shapes.update({f"encoder.down.{level}.downsample.conv.weight": (cin, cin, 3, 3),
                           f"encoder.down.{level}.downsample.conv.bias": (cin,)})
            res //= 2
    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid.block_1", cin, cin)
        attn(f"{part}.mid.attn_1", cin)
        resnet(f"{part}.mid.block_2", cin, cin)
    shapes.update({"encoder.norm_out.weight": (cin,), "encoder.norm_out.bias": (cin,),
                   "encoder.conv_out.weight": (2 * z, cin, 3, 3), "encoder.conv_out.bias": (2 * z,),
                   "decoder.conv_in.weight": (cin, z, 3, 3), "decoder.conv_in.bias": (cin,)})
    for level in reversed(range(n)):
        for i in range(layout.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{i}", cin, ch * mult[level])
            cin = ch * mult[level]
            if res in layout.decoder_attn:
                attn(f"decoder.up.{level}.attn.{i}", cin)
        if level != 0:
            shapes.update({f"decoder.up.{level}.upsample.conv.weight": (cin, cin, 3, 3),
                           f"decoder.up.{level}.upsample.conv.bias": (cin,)})
            res *= 2
    shapes.update({"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
                   "decoder.conv_out.weight": (3, cin, 3, 3), "decoder.conv_out.bias": (3,),
                   "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
                   "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    return shapes


def random_ldm_state(layout: LdmLayout, seed: int = 0, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights in the LDM checkpoint layout of `layout` (plus `extras`: key -> shape), unit-variance
    activations (randn / sqrt(fan-in)), GroupNorm scales near 1: stand-ins for tests and `scripts/rehearse.py`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in {**ldm_key_shapes(layout), **(extras or {})}.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=g) / fan_in**0.5
        if ".norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        state[key] = value
    return state

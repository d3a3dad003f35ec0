"""usp encoders (pretraining, probe or classifier weights) -> a timm `VisionTransformer` folder.

usp's ViT keeps timm's key names (`patch_embed.proj`, `cls_token`, `pos_embed` with the cls slot first,
`blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm` / `fc_norm`, `head`), so most tensors
go across unchanged. What changes:
  * pretraining weights: the encoder only (the decoder and `mask_token` are dropped; timm would read a
    `mask_token` as a DINOv2 checkpoint), as a feature model: num_classes=0, cls-token pooling after `norm`;
  * probe weights: the head is BatchNorm1d(affine=False) + Linear; in eval mode that is one affine map, folded
    exactly into timm's Linear head: W' = W / sqrt(var + eps), b' = b − W' · mean;
  * global pooling: usp's mean-of-patch-tokens + `fc_norm` is timm's global_pool='avg' (fc_norm, no `norm`).
The folder is timm's Hub layout (config.json with architecture, model_args and pretrained_cfg; model.safetensors):
`timm.create_model("local-dir:OUT")` or, after upload, `"hf-hub:user/repo"`, builds the network and loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHITECTURE = "vit_base_patch16_224"  # any timm ViT entry point: model_args below replace all of its sizes
WEIGHTS_NAME = "model.safetensors"
_DROPPED_PREFIXES = ("decoder_", "mask_token")


def _fold_probe_head(state: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """head.0 (BatchNorm1d, no affine, eval statistics) + head.1 (Linear) -> one Linear `head`."""
    mean, var = state.pop("head.0.running_mean").double(), state.pop("head.0.running_var").double()
    state.pop("head.0.num_batches_tracked", None)
    weight, bias = state.pop("head.1.weight").double(), state.pop("head.1.bias").double()
    weight = weight / torch.sqrt(var + eps)  # (K, D) columns scaled
    state["head.weight"], state["head.bias"] = weight.float(), (bias - weight @ mean).float()
    return state


def timm_state_and_args(weights: dict[str, torch.Tensor], config, family: str) -> tuple[dict, dict]:
    """(timm state dict, timm model_args) of a usp encoder's weights file and recipe."""
    from usp.latent.vae import spec_of
    from usp.models import SIZES, model_entry

    entry = model_entry(config.model.name, ("vit", "vit_cls"))
    size, spec = SIZES[entry.size], spec_of(config.latent.space)
    state = {k: v for k, v in weights.items() if not k.startswith(_DROPPED_PREFIXES)}
    if "head.0.running_mean" in state:
        state = _fold_probe_head(state)
    if family == "vit":  # pretraining: the encoder as a feature model
        global_pool, num_classes = "token", 0
    else:
        global_pool = "avg" if "fc_norm.weight" in state else "token"
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    args = dict(img_size=config.data.image_size // spec.factor, patch_size=entry.patch_size, in_chans=spec.channels,
                embed_dim=size.width, depth=size.depth, num_heads=size.heads, mlp_ratio=mlp_hidden / size.width,
                class_token=True, global_pool=global_pool, num_classes=num_classes)
    return state, args


def write_timm(weights: dict[str, torch.Tensor], config, family: str, out: Path,
               class_names: list[str] | None) -> dict:
    """config.json + model.safetensors in `out`. Returns the config written."""
    from usp.latent.vae import scale_and_shift

    state, args = timm_state_and_args(weights, config, family)
    scale, shift = scale_and_shift(config.latent.space, config.latent.path)
    channels, side = args["in_chans"], args["img_size"]
    pretrained_cfg = {"input_size": [channels, side, side], "fixed_input_size": True, "interpolation": "bicubic",
                      "crop_pct": 1.0, "crop_mode": "center", "mean": [0.0] * channels, "std": [1.0] * channels,
                      "num_classes": args["num_classes"], "pool_size": None, "first_conv": "patch_embed.proj",
                      "classifier": "head"}
    timm_config = {"architecture": ARCHITECTURE, "num_classes": args["num_classes"], "num_features": args["embed_dim"],
                   "global_pool": args["global_pool"], "model_args": args, "pretrained_cfg": pretrained_cfg,
                   # not read by timm: what its inputs are (VAE latents, normalised z = scale · (x − shift))
                   "usp": {"inputs": "VAE latents, z = scale * (x - shift), x the VAE posterior mean",
                           "latent_space": config.latent.space, "latent_path": config.latent.path,
                           "scale": scale, "shift": shift, "image_size": config.data.image_size,
                           "task": config.run.task, "model": config.model.name}}
    if class_names and args["num_classes"] == len(class_names):
        timm_config["label_names"] = list(class_names)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME))
    (out / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    return timm_config


def is_timm_folder(path: str | Path) -> bool:
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / "config.json").is_file():
        return False
    try:
        return "architecture" in json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        return False

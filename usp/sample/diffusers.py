"""Reading a diffusers DiT folder into a usp generator: ours (`usp export --to diffusers`, with its `_usp` block) or a
public one (facebook/DiT-XL-2-256's layout, read as DiT on SD-VAE latents). `usp sample FOLDER` comes here through
`load_generator`; the key mapping is `usp.models.diffusers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from usp.models.diffusers import TRANSFORMER_CLASSES, USP_KEY, from_diffusers_state


def is_diffusers_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder (model_index.json or transformer/config.json) or a transformer folder itself."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "transformer" / "config.json").is_file()
                              or _class_name(path / "config.json") in TRANSFORMER_CLASSES)


def _class_name(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        return None


def transformer_folder(path: str | Path) -> Path:
    path = Path(path)
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if _class_name(folder / "config.json") not in TRANSFORMER_CLASSES:
        raise ValueError(f"{folder} holds no diffusers DiT transformer (config.json _class_name is not one of "
                         f"{', '.join(TRANSFORMER_CLASSES)})")
    return folder


def read_transformer(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A diffusers transformer folder -> (its config.json, its weights), from safetensors or a weights-only .bin."""
    config = json.loads((folder / "config.json").read_text())
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        file = folder / name
        if file.is_file():
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                return config, load_file(str(file))
            return config, torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin (sharded folders are not "
                            "read); re-save it with save_pretrained(..., max_shard_size='100GB')")


def _public_name(tconfig: dict) -> str:
    """The registry name of a public DiT transformer config (width, depth, heads, patch), e.g. dit_xl_2."""
    from usp.models import SIZES

    width = tconfig["num_attention_heads"] * tconfig["attention_head_dim"]
    for size, s in SIZES.items():
        if (s.width, s.depth, s.heads) == (width, tconfig["num_layers"], tconfig["num_attention_heads"]):
            return f"dit_{size}_{tconfig['patch_size']}"
    raise ValueError(f"no registered DiT has width {width}, depth {tconfig['num_layers']} and "
                     f"{tconfig['num_attention_heads']} heads; pass --model")


def load_diffusers_generator(path: str | Path, overrides=(), model_name: str | None = None):
    """A diffusers folder (ours, or a public DiT such as facebook/DiT-XL-2-256) -> (usp DiT, Config), like
    `usp.sample.run.load_generator` does for a weights file. A public folder is read as DiT on SD-VAE (ema)
    latents of sample_size × 8 pixels, with num_embeds_ada_norm classes; overrides change any of it."""
    from usp.config import config_from_dict
    from usp.latent.vae import spec_of
    from usp.run.weights import load_strict
    from usp.sample.run import build_generator

    root = Path(path)
    folder = transformer_folder(root)
    tconfig, state = read_transformer(folder)
    usp = tconfig.get(USP_KEY)
    if usp:
        extra = []
        small_vae = root / "vae" / "usp"
        if (small_vae / "config.json").is_file() and not any(o.startswith("latent.path=") for o in overrides):
            extra.append(f"latent.path={small_vae}")
        config = config_from_dict(usp["config"], [*extra, *overrides])
        num_classes, null_row = usp["num_classes"], usp["null_label_row"]
    else:
        name = model_name or _public_name(tconfig)
        factor = spec_of("sd-vae-ft-ema").factor
        num_classes = tconfig.get("num_embeds_ada_norm") or 1000
        learn_sigma = tconfig.get("out_channels") == 2 * tconfig.get("in_channels", 4)
        base = [f"model.name={name}", f"data.image_size={tconfig['sample_size'] * factor}",
                f"model.num_classes={num_classes}", f"generation.learn_sigma={str(learn_sigma).lower()}"]
        config = config_from_dict({}, [*base, *overrides])
        null_row = num_classes
    if model_name and usp:
        config.model.name = model_name
    model = build_generator(config)
    null_row = null_row if model.y_embedder.dropout_prob > 0 else None
    weights = from_diffusers_state(state, model.depth, num_classes, null_row)
    weights["pos_embed"] = model.pos_embed.detach().clone()  # diffusers recomputes the same sin-cos table
    load_strict(model, weights, str(folder))
    return model.eval(), config

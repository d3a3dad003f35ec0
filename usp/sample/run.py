"""`usp sample`: load a generator (ours, a public DiT/SiT checkpoint, or USP's fine-tuned weights), draw
class-conditional samples sharded across torchrun ranks, write ADM's NPZ and a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch

from usp.config import Config, config_from_dict
from usp.latent.vae import LatentSpace
from usp.models.dit import DiT
from usp.models.transfer import load_state_dict_file
from usp.sample.guided import sample_sharded, save_grid
from usp.train.checkpoint import load_strict, load_weights
from usp.train.engine import setup_runtime
from usp.train.tasks.generation import build_generator


def load_generator(weights: str | Path, overrides: list[str] | tuple = (), model_name: str | None = None
                   ) -> tuple[DiT, Config]:
    """Our `weights_*.safetensors` carry their recipe; anything else (a public DiT/SiT `.pt`, USP's
    fine-tuned weights) needs `model_name` and recipe overrides for the latent space and sizes."""
    path = Path(weights)
    meta = load_weights(path)[1] if path.suffix == ".safetensors" else {}
    if meta.get("config"):
        if meta.get("task") != "finetune":
            raise ValueError(f"{path} holds {meta.get('task')} weights; sampling needs a `usp finetune` checkpoint")
        config = config_from_dict(meta["config"], overrides)
        if model_name:
            config.model.name = model_name
    else:
        if model_name is None:
            raise ValueError(f"{path} has no usp metadata; pass --model (e.g. dit_xl_2 or sit_xl_2) and overrides "
                             "such as data.image_size=256 model.affine_norms=true for USP's fine-tuned weights")
        # SiT's defaults sit under the overrides (a layer of their own), so a generation.preset given there wins
        method = {"generation": {"method": "transport", "sampler": "ode"}} if model_name.startswith("sit") else {}
        config = config_from_dict(method, [*overrides, f"model.name={model_name}"])
    model = build_generator(config)
    state = load_weights(path)[0] if path.suffix == ".safetensors" else load_state_dict_file(path)
    load_strict(model, state, str(path))
    return model.eval(), config


def run_sampling(weights: str | Path, overrides: list[str] | tuple = (), out_dir: str | Path | None = None,
                 num_samples: int = 64, seed: int = 0, balanced: bool = False, batch_size: int | None = None,
                 model_name: str | None = None, grid: int = 64) -> Path:
    model, config = load_generator(weights, overrides, model_name)
    batch_size = batch_size or config.train.eval_batch  # per rank; the VAE decodes latent.vae_batch at a time
    runtime = setup_runtime(config.run.device)
    model.to(runtime.device)
    latent = LatentSpace.load(config.latent.space, config.latent.path, max_batch=config.latent.vae_batch)
    latent = latent.to(runtime.device)
    side = latent.check_image_size(config.data.image_size)
    out = Path(out_dir) if out_dir else Path(weights).parent.parent / f"samples_{num_samples}"
    npz = sample_sharded(model, latent.decode, config.generation, out, num_samples, seed, config.model.num_classes,
                         balanced, (latent.channels, side, side), runtime.rank, runtime.world_size,
                         batch_size=batch_size, progress=runtime.is_main)
    if runtime.is_main and grid:
        import numpy as np

        images = np.load(npz)["arr_0"][:grid]
        save_grid(images, out / "grid.png", nrow=int(len(images) ** 0.5) or 1)
    if runtime.world_size > 1:
        torch.distributed.destroy_process_group()
    return npz

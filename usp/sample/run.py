"""`usp sample`: the generator of a recipe (`build_generator`, also what generation training trains), loaded
from weights (ours, a public DiT/SiT checkpoint, or USP's fine-tuned weights); class-conditional samples
sharded across torchrun ranks, written as ADM's NPZ and a PNG grid. Imports no training code."""

from __future__ import annotations

from pathlib import Path

import torch

from usp.config import Config, config_from_dict
from usp.latent.vae import LatentSpace, spec_of
from usp.models import create_model, model_entry
from usp.models.dit import DiT
from usp.models.repa import strip_projectors
from usp.run.runtime import setup_runtime
from usp.run.weights import load_strict, load_weights, resolve_weights
from usp.sample.guided import sample_sharded, save_grid

GENERATOR_FAMILIES = ("dit", "sit", "lightningdit")


def build_generator(config: Config) -> DiT:
    """The registered DiT/SiT/LightningDiT of model.name, sized for the recipe's latent space and image size."""
    spec = spec_of(config.latent.space)
    lightning = model_entry(config.model.name, GENERATOR_FAMILIES).family == "lightningdit"
    if lightning and config.model.affine_norms:
        raise ValueError("model.affine_norms is USP's DiT/SiT block; LightningDiT's norms are learnable with "
                         "model.use_rmsnorm (its default): remove model.affine_norms")
    block = config.model.block_options() if lightning else {"affine_norms": config.model.affine_norms}
    return create_model(config.model.name, GENERATOR_FAMILIES, input_size=config.data.image_size // spec.factor,
                        in_channels=spec.channels, num_classes=config.model.num_classes,
                        class_dropout_prob=config.model.class_dropout, learn_sigma=config.generation.learn_sigma,
                        **block)


def load_generator(weights: str | Path, overrides: list[str] | tuple = (), model_name: str | None = None
                   ) -> tuple[DiT, Config]:
    """Our `weights_*.safetensors` carry their recipe; anything else (a public DiT/SiT `.pt`, USP's
    fine-tuned weights) needs `model_name` and recipe overrides for the latent space and sizes."""
    path = Path(weights)
    if path.is_dir():  # an exported or public diffusers folder (resolve_weights returns it as is)
        from usp.sample.diffusers import load_diffusers_generator

        return load_diffusers_generator(path, overrides, model_name)
    state, meta = load_weights(path)  # read once: the weights and, for ours, the recipe they were trained with
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
        if model_name.startswith("lightningdit"):  # velocity only: LightningDiT's checkpoints have no sigma channels
            method = {"generation": {"method": "transport", "sampler": "ode", "learn_sigma": False}}
        config = config_from_dict(method, [*overrides, f"model.name={model_name}"])
    model = build_generator(config)
    load_strict(model, strip_projectors(state), str(path))  # REPA's projector is a training-time head
    return model.eval(), config


def run_sampling(weights: str | Path, overrides: list[str] | tuple = (), out_dir: str | Path | None = None,
                 num_samples: int = 64, seed: int = 0, balanced: bool = False, batch_size: int | None = None,
                 model_name: str | None = None, grid: int = 64) -> Path:
    model, config = load_generator(weights, overrides, model_name)
    batch_size = batch_size or config.train.eval_batch  # per rank; the VAE decodes latent.vae_batch at a time
    runtime = setup_runtime(config.run.device)
    model.to(runtime.device)
    latent = LatentSpace.load(config.latent.space, config.latent.path, cache=config.latent.cache,
                              max_batch=config.latent.vae_batch).to(runtime.device)
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


def sample_command(weights: str, overrides: list[str], model: str | None = None, out: str | None = None,
                   num_samples: int = 64, seed: int = 0, balanced: bool = False, batch_size: int | None = None,
                   grid: int = 64) -> None:
    """`usp sample WEIGHTS`: `run_sampling` of a weights file, a run folder (its latest) or a diffusers folder."""
    path = run_sampling(resolve_weights(weights), overrides, out_dir=out, num_samples=num_samples, seed=seed,
                        balanced=balanced, batch_size=batch_size, model_name=model, grid=grid)
    print(f"wrote {path}")

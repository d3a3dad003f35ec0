"""`usp export --to diffusers`: a usp DiT / SiT as a diffusers folder (transformer, scheduler, VAE, pipeline index).

The key mapping, the diffusers quirks it respects and the proof of equality are in `usp.models.diffusers`; reading
a folder back is `usp.sample.diffusers`. Here: which scheduler and which VAE component each run gets, and the
`_usp` block of the transformer's config.json (family, objective, guidance, latent space, recipe).
"""

from __future__ import annotations

import json
from pathlib import Path

from usp.models.diffusers import (
    PIPELINE_NULL_LABEL,
    USP_KEY,
    check_position_table,
    to_diffusers_state,
    transformer_config,
)
from usp.models.dit import DiT

# --------------------------------------------------------------------------------------------
# The exported folder, and reading one (ours or a public DiT in diffusers layout) back into usp
# --------------------------------------------------------------------------------------------


def _scheduler(config, notes: list[str]):
    """DiT: DDIM over DiT's linear betas (DiTPipeline drops the learned variance, so only DDIM or fixed-variance
    DDPM can step it). SiT, linear path + velocity: flow-matching Euler (equal to usp's Euler ODE on its grid)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    gen = config.generation
    schedulers = {  # per generation.method
        "ddpm": lambda: DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                      clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                      prediction_type="epsilon", timestep_spacing="leading"),
        "transport": lambda: (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
                              if gen.path == "linear" and gen.prediction == "velocity" else None),
    }
    if (scheduler := schedulers[gen.method]()) is not None:
        return scheduler
    notes.append(f"no diffusers scheduler: the {gen.path} path with {gen.prediction} prediction has no diffusers "
                 "equivalent; sample with usp")
    return None


def _write_vae(config, out: Path, notes: list[str]) -> list | None:
    """The vae/ component: ours for the small f4 VAE, a copy of a local AutoencoderKL, else a hub reference."""
    from usp.latent.small_vae import is_small_vae_folder
    from usp.latent.vae import LatentSpace, scale_and_shift, spec_of

    space, path = config.latent.space, config.latent.path
    spec = spec_of(space)
    if path and Path(path).is_dir() and is_small_vae_folder(path):
        from usp.export.vae import SmallVAEForDiffusers
        from usp.latent.small_vae import SmallVAE

        latent = LatentSpace.load(space, path)
        SmallVAEForDiffusers.from_small_vae(latent.vae, latent.scale, latent.shift).save_pretrained(out / "vae")
        SmallVAE.from_pretrained(path).save_pretrained(out / "vae" / "usp")  # what usp reads back
        (out / "vae" / "usp" / "latent_stats.json").write_text((Path(path) / "latent_stats.json").read_text())
        notes.append("vae/: usp's small f4 VAE (diffusers' AutoencoderKL cannot hold it); loading it needs usp")
        return ["usp.export.vae", "SmallVAEForDiffusers"]
    if spec.kind == "diffusers" and spec.norm in ("constant", "usp_stats", "vae_config"):
        scale, shift = scale_and_shift(space, path)
        if isinstance(scale, float) and shift == 0.0 and path and Path(path).is_dir():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path)
            vae.register_to_config(scaling_factor=scale)
            vae.save_pretrained(out / "vae")
            return ["diffusers", "AutoencoderKL"]
        if isinstance(scale, float) and shift == 0.0:
            notes.append(f"vae: a reference, not a copy: DiTPipeline.from_pretrained(OUT, vae=AutoencoderKL."
                         f"from_pretrained({path or spec.default_path!r}))")
            return None
    notes.append(f"vae: latent space {space} cannot be decoded by DiTPipeline (it divides by one scaling_factor); "
                 "decode with usp")
    return None


def write_diffusers(model: DiT, config, family: str, out: Path, class_names: list[str] | None) -> list[str]:
    """Write `model` (a usp DiT/SiT with its recipe `config`) as a diffusers folder into `out` (new). Returns notes.

    DiT: model_index.json (DiTPipeline) + transformer/ + scheduler/ (DDIM) + vae/ (or a reference) + id2label.
    SiT: transformer/ + scheduler/ (flow-matching Euler, when the path allows) + vae/; no pipeline (diffusers has
    no SiT pipeline): the model card says how to sample. transformer/config.json carries `_usp`: the family, the
    objective's settings, the latent space and the recipe usp reads it back with.
    """
    from diffusers import DiTTransformer2DModel

    from usp.latent.vae import scale_and_shift, spec_of

    check_position_table(model)
    notes: list[str] = []
    transformer = DiTTransformer2DModel(**transformer_config(model))
    transformer.load_state_dict(to_diffusers_state(model), strict=True)
    transformer.save_pretrained(out / "transformer")
    recipe = config.to_dict()
    recipe["model"]["affine_norms"] = False  # folded into the modulation (module doc); the network is unchanged
    recipe["model"]["init"] = None
    gen = recipe["generation"]
    scale, shift = scale_and_shift(config.latent.space, config.latent.path)
    objective = ({"method": "ddpm", "learn_sigma": gen["learn_sigma"], "num_timesteps": 1000,
                  "betas": "linear 1e-4..0.02"}
                 if family == "dit" else {k: gen[k] for k in ("method", "time", "path", "prediction", "train_eps",
                                                              "sample_eps", "sampler", "ode_method", "sample_steps",
                                                              "timestep_shift")})
    usp = {"family": family, "model": config.model.name, "num_classes": model.y_embedder.num_classes,
           "null_label_row": PIPELINE_NULL_LABEL if model.y_embedder.dropout_prob > 0 else None,
           "time_input": "DDPM timestep 0..999" if family == "dit" else (
               "transport t in [0, 1], 0 = noise, 1 = data" if gen["time"] == "sit"
               else "REPA time s in [0, 1], 0 = data, 1 = noise; the output is the velocity dx/ds"),
           "objective": objective,
           "guidance": {k: gen[k] for k in ("cfg_scale", "guided_channels", "guidance_interval")},
           "latent": {"space": config.latent.space, "channels": spec_of(config.latent.space).channels,
                      "factor": spec_of(config.latent.space).factor, "scale": scale, "shift": shift,
                      "vae": config.latent.path or spec_of(config.latent.space).default_path},
           "config": recipe}
    config_file = out / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), USP_KEY: usp}, indent=2) + "\n")
    scheduler = _scheduler(config, notes)
    if scheduler is not None:
        scheduler.save_pretrained(out / "scheduler")
    vae = _write_vae(config, out, notes)
    if family == "dit":
        import diffusers

        index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", type(scheduler).__name__],
                 "transformer": ["diffusers", "DiTTransformer2DModel"],
                 "vae": vae or [None, None]}
        if class_names:
            index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return notes

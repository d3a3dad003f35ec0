"""`--to hub`: the folder a user uploads with huggingface_hub (nothing is uploaded here).

    README.md            the model card: metadata block (library, license, datasets, tags), what the run was,
                         every metric the run logged with the protocol that produced it, how to load it with and
                         without usp, and the sampling caveats of the target library
    model_index.json …   the diffusers folder (DiT / SiT) or config.json + model.safetensors (timm encoders)
    usp/weights.safetensors, usp/recipe.yaml   the run's own weights file and its resolved recipe
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

HUB_DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist"}
NO_FORM = {"lightningdit": "diffusers has no LightningDiT transformer (SwiGLU, RMSNorm, 2-D RoPE)",
           "vit_lightning": "timm's VisionTransformer has no encoder with LightningDiT's blocks (RMSNorm, SwiGLU, "
                            "RoPE)"}
# The step of the SiT card's diffusers-only loop, per ODE solver of the run: its name and the line that sets the slope
# k2 at the step's end (Euler reuses k1). Any other solver (the SDE, adaptive dopri5) is written as Euler steps on
# the grid `usp.diffusion.ode_grid_steps` gives it, and the card says so.
LOOP_STEPS = {"euler": ("Euler", "k2 = k1"), "heun": ("Heun", "k2 = velocity(x + (t1 - t0) * k1, t1, y)")}
TASK_TAGS = {"pretrain": ["masked-latent-modeling", "feature-extraction"], "probe": ["image-classification"],
             "classify": ["image-classification"], "finetune": ["class-conditional-image-generation"]}


def write_hub(weights, meta, config, family: str, out: Path, class_names: list[str] | None, license: str,
              source: Path) -> list[str]:
    from usp.run.weights import resolve_weights

    notes: list[str] = []
    if family in ("dit", "sit"):
        from usp.export import build_run_generator
        from usp.export.diffusers import write_diffusers

        try:
            notes = write_diffusers(build_run_generator(weights, config), config, family, out, class_names)
        except ValueError as err:  # diffusers cannot hold this network (it is refused before anything is written)
            notes = [f"no diffusers folder: {err}"]
    elif family in ("vit", "vit_cls"):
        from usp.export.timm import write_timm

        write_timm(weights, config, family, out, class_names)
    else:
        notes = [f"no diffusers or timm folder: {NO_FORM[family]}"]
    source = resolve_weights(source)
    (out / "usp").mkdir()
    shutil.copyfile(source, out / "usp" / "weights.safetensors")
    (out / "usp" / "recipe.yaml").write_text(config.to_yaml())
    library = "diffusers" if (out / "transformer").is_dir() else "timm" if (out / "config.json").is_file() else "usp"
    card = model_card(meta, config, family, class_names, license, source.parent.parent, notes, library)
    (out / "README.md").write_text(card)
    return notes


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


def _metadata(config, family: str, license: str, library: str) -> str:
    source = config.data.source
    dataset = HUB_DATASETS.get(source) or Path(config.data.root or "images").name
    tags = ["usp", family.replace("_cls", ""), library, *TASK_TAGS.get(config.run.task, [])]
    meta = {"library_name": library, "license": license, "datasets": [dataset], "tags": tags}
    if family in ("vit", "vit_cls", "vit_lightning"):
        meta["pipeline_tag"] = "image-classification" if family == "vit_cls" else "image-feature-extraction"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _metrics(run_dir: Path, config) -> list[str]:
    """One table row per metric the run logged (its last value and step) with the setting that produced it."""
    from usp.run.log import read_log

    train, evals = read_log(run_dir)
    lines = []
    if train:
        last = train[-1]
        what = {"pretrain": f"masked latent MSE over masked patches, mask ratio {config.pretrain.mask_ratio}",
                "finetune": f"{config.generation.method} training loss", "probe": "cross-entropy of the probe head",
                "classify": "cross-entropy (with the run's mixup / label smoothing)"}.get(config.run.task, "loss")
        lines.append(f"| training loss | {last['loss']:.4f} | {last['step']} | {what}; "
                     f"batch {config.train.global_batch}, {last.get('images_seen', '?')} images seen |")
    latest: dict[str, tuple[int, dict]] = {}  # metric -> (step, the row it was last logged in)
    for row in evals:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                latest[key] = (row["step"], row)
    gen = config.generation
    steps = f"{gen.ode_method}, {gen.sample_steps} grid points" if gen.sampler == "ode" else f"{gen.sample_steps} steps"
    sampling = (f"{gen.sampler} sampler ({steps}), CFG {gen.cfg_scale} on {gen.guided_channels or 'all'} channels"
                f"{', guidance interval ' + str(list(gen.guidance_interval)) if gen.guidance_interval else ''}, "
                f"{'EMA' if config.train.ema_decay else 'model'} weights, class-balanced labels")
    result = run_dir / "result.json"
    protocol = json.loads(result.read_text()).get("protocol") if result.is_file() else None
    for key, (step, row) in latest.items():
        value = f"{row[key]:.4g}"
        if key in ("domain_fd_se", "samples"):
            continue  # shown with domain_fd
        if key in ("top1", "top5"):
            setting = (f"{protocol['name']}: {protocol['classifier']}; {protocol['schedule']}; augmentation "
                       f"{protocol['augmentation']}" if protocol else f"top-k accuracy (%) on {config.data.eval_split}")
        elif key in ("domain_fd", "class_agreement"):
            if key == "domain_fd" and "domain_fd_se" in row:
                value += f" ± {row['domain_fd_se']:.2g}"
            what = ("Fréchet distance of a small domain classifier's features (NOT Inception FID; ± bootstrap error)"
                    if key == "domain_fd" else "fraction of samples the domain classifier gives their own label")
            count = int(row.get("samples", gen.eval_samples))
            setting = f"{what}; {count} samples vs real {config.data.source}; {sampling}"
        else:
            setting = "as logged by the run"
        lines.append(f"| {key} | {value} | {step} | {setting} |")
    return lines


def _diffusers_usage(config, family: str) -> str:
    from usp.latent.vae import spec_of

    gen, spec = config.generation, spec_of(config.latent.space)
    side, g = config.data.image_size // spec.factor, gen.guided_channels
    if family == "dit":
        return f"""```python
import torch
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("OUT")  # add vae=AutoencoderKL.from_pretrained(...) if vae/ is a reference
# diffusers' DiT uses timestep frequencies 10000^(-k/127) where DiT trained with 10000^(-k/128); this sets DiT's:
for block in pipe.transformer.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={gen.cfg_scale}, num_inference_steps=50,
              generator=torch.manual_seed(0)).images
```
DiTPipeline samples with DDIM (it drops the learned variance) and guides all {spec.channels} latent channels; the
run's own setting is {gen.sampler}, {gen.sample_steps} steps, CFG {gen.cfg_scale} on {g or 'all'} channels.
`usp sample OUT --balanced generation.sampler=ddim generation.sample_steps=ddim50
generation.guided_channels={spec.channels}` gives the same images as the pipeline above (with DiT's time frequencies
set) called with `class_labels=[i % {config.model.num_classes} for i in range(N)]`, `num_inference_steps=50` and one
generator per image, `torch.Generator().manual_seed(seed + i + 1_000_003)`."""
    if gen.path != "linear" or gen.prediction != "velocity":
        return (f"diffusers has no SiT pipeline and no scheduler for the {gen.path} path with {gen.prediction} "
                "prediction: sample with usp (below). The transformer itself loads as a `DiTTransformer2DModel` "
                '(`from_pretrained("OUT", subfolder="transformer")`).')
    return _sit_loop(config, g, side)


def _sit_loop(config, g: int | None, side: int) -> str:
    """A diffusers-only loop that is usp's fixed-grid ODE sampler (linear path, velocity prediction)."""
    from usp.diffusion import ode_grid_steps

    gen = config.generation
    steps = ode_grid_steps(gen)  # as the run's sampler: the grid has one point more
    solver = gen.ode_method if gen.sampler == "ode" and gen.ode_method in LOOP_STEPS else "euler"
    step, second_slope = LOOP_STEPS[solver]
    mix = "cond, uncond = v.chunk(2)" if g is None else f"cond, uncond = v[:, :{g}].chunk(2)  # guided channels"
    mixed = ("uncond + s * (cond - uncond)" if g is None
             else f"torch.cat([uncond + s * (cond - uncond), v[:len(x), {g}:]], 1)")
    guided = "s > 1" if gen.guidance_interval is None else (  # guide only where the noise level 1 - t is inside
        f"s > 1 and {gen.guidance_interval[0]} <= 1 - float(t) <= {gen.guidance_interval[1]}")
    net_call = ("net(x, timestep=t.expand(len(x)), class_labels=y).sample[:, :C]" if gen.time == "sit" else
                "-net(x, timestep=(1 - t).expand(len(x)), class_labels=y).sample[:, :C]  # trained in REPA time")
    shift = gen.timestep_shift
    grid = f"ts = torch.linspace(0, 1, {steps + 1})" + (
        f"\n    ts = {shift} * ts / (1 + ({shift} - 1) * ts)  # the run's timestep shift" if shift > 0 else "")
    note = (f" (the run itself sampled with the {gen.sampler.upper()}, which this loop does not do)"
            if gen.sampler != "ode" else "" if gen.ode_method in LOOP_STEPS
            else f" ({gen.ode_method} is adaptive: this is a {steps}-step grid instead)")
    return f"""diffusers has no SiT pipeline; the transformer loads as a `DiTTransformer2DModel` and this loop is usp's
{step} ODE sampler ({steps} steps, t from 0 = noise to 1 = data, linear path, velocity){note}:
```python
import torch
from diffusers import DiTTransformer2DModel

net = DiTTransformer2DModel.from_pretrained("OUT", subfolder="transformer").eval()
for block in net.transformer_blocks:  # DiT's timestep frequencies (diffusers' default differs)
    block.norm1.emb.time_proj.downscale_freq_shift = 0
C, s = net.config.in_channels, {gen.cfg_scale}

def net_velocity(x, t, y):  # the network's velocity at SiT time t
    return {net_call}

def velocity(x, t, y):  # guided; the null label is row 1000 of the label table
    if not ({guided}):
        return net_velocity(x, t, y)
    v = net_velocity(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, 1000)]))
    {mix}
    return {mixed}

@torch.no_grad()
def sample(y, generators):
    x = torch.stack([torch.randn(C, {side}, {side}, generator=g) for g in generators])
    {grid}
    for t0, t1 in zip(ts[:-1], ts[1:]):
        k1 = velocity(x, t0, y)
        {second_slope}
        x = x + (t1 - t0) * (k1 + k2) / 2
    return x  # normalised latents
```
{_decode_hint(config)}
For Euler, diffusers' `FlowMatchEulerDiscreteScheduler` (in scheduler/, shift 1) takes the same steps when given
`sigmas = 1 - ts[:-1]` and the network's SiT-time velocity negated (its time runs from noise σ = 1 to data σ = 0).
usp's Heun does not match `FlowMatchHeunDiscreteScheduler` (that grid ends at σ_min and its last step is Euler),
nor dopri5 any fixed-step scheduler."""


def _decode_hint(config) -> str:
    """How to turn the normalised latents into images, for the VAE the export wrote or referenced."""
    from usp.latent.small_vae import is_small_vae_folder
    from usp.latent.vae import scale_and_shift, spec_of

    path = config.latent.path
    if path and Path(path).is_dir() and is_small_vae_folder(path):
        return ("Images in [-1, 1]: `SmallVAEForDiffusers.from_pretrained(\"OUT\", subfolder=\"vae\")"
                ".decode(x).sample` (`from usp.export.vae import SmallVAEForDiffusers`: diffusers' AutoencoderKL "
                "cannot hold this VAE).")
    scale, shift = scale_and_shift(config.latent.space, path)
    vae = path or spec_of(config.latent.space).default_path
    if isinstance(scale, float) and shift == 0.0:
        return f"Images in [-1, 1]: `AutoencoderKL.from_pretrained({vae!r}).decode(x / {scale}).sample`."
    return f"Images: decode with usp, `LatentSpace.load({config.latent.space!r}, {vae!r}).decode(x)`."


def model_card(meta, config, family: str, class_names, license: str, run_dir: Path, notes: list[str],
               library: str) -> str:
    from usp.latent.vae import scale_and_shift, spec_of

    spec = spec_of(config.latent.space)
    scale, shift = scale_and_shift(config.latent.space, config.latent.path)
    side = config.data.image_size // spec.factor
    repa = ", REPA" if config.repa.enabled else ""
    what = {"dit": "DiT (DDPM, learned sigma)", "sit": f"SiT (transport{repa})",
            "lightningdit": "LightningDiT (transport)", "vit": "USP encoder (masked latent modeling)",
            "vit_lightning": "USP encoder with LightningDiT's blocks", "vit_cls": "ViT classifier on latents"}[family]
    lines = [_metadata(config, family, license, library), f"# {config.run.name}: {meta['model']}, {what}", "",
             f"Trained with [usp](https://arxiv.org/abs/2503.06132) (`usp {config.run.task}`), step {meta.get('step')}"
             f"{', EMA weights' if meta.get('ema') else ''}; initialised from `{config.model.init or 'random'}`.", "",
             "## Latents", "",
             f"Inputs and outputs are VAE latents, not pixels: latent space `{config.latent.space}` "
             f"({spec.channels} channels, {spec.factor}× downsampling: {config.data.image_size} px images ↔ "
             f"{spec.channels}×{side}×{side} latents), normalised as z = scale · (x − shift) with scale {scale} and "
             f"shift {shift}, x the VAE posterior mean. VAE: `{config.latent.path or spec.default_path}`.", ""]
    if class_names:
        lines += [f"Classes ({len(class_names)}): " + ", ".join(f"{i} {n}" for i, n in enumerate(class_names)), ""]
    rows = _metrics(run_dir, config) if (run_dir / "log.jsonl").is_file() else []
    lines += ["## Metrics", "", "What the run logged (the last value of each), with the protocol that produced it.", ""]
    lines += (["| metric | value | step | protocol |", "|---|---|---|---|", *rows] if rows
              else ["No log.jsonl beside the weights file: no metric to report."])
    lines += ["", "## Load without usp", ""]
    if library == "usp":
        lines.append("This network has no diffusers or timm form (see Notes); `usp/weights.safetensors` holds it.")
    elif library == "diffusers":
        lines.append(_diffusers_usage(config, family))
    else:
        c = spec.channels
        lines += ["```python", "import timm, torch", "",
                  'model = timm.create_model("local-dir:OUT", pretrained=True).eval()  # or "hf-hub:<user>/<repo>"',
                  "# or: timm.create_model(\"vit_base_patch16_224\", pretrained=True, **config['model_args'],",
                  "#         pretrained_cfg_overlay=dict(file='OUT/model.safetensors',",
                  f"#                                     input_size=({c}, {side}, {side}),",
                  "#                                     num_classes=config['num_classes']))",
                  f"features = model.forward_features(torch.randn(1, {c}, {side}, {side}))  # latents, see above",
                  "```"]
    lines += ["", "## Load with usp", "", "```bash"]
    folder = "OUT" if library != "usp" else "OUT/usp/weights.safetensors"
    if family in ("dit", "sit", "lightningdit"):
        lines.append(f"usp sample {folder} --num-samples 64 --out samples   # any generation.* override applies")
    else:
        lines.append(f"usp probe RECIPE model.init={folder}   # or usp classify / usp finetune; {config.model.name}")
    lines += ["```", "", "`usp/weights.safetensors` is the run's own weights file and `usp/recipe.yaml` its resolved "
              "recipe: `usp sample usp/weights.safetensors` or `model.init=usp/weights.safetensors` read them as usp "
              "wrote them."]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"

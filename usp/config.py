"""Typed recipes: YAML files loaded into dataclasses, with dotted `key=value` overrides.

An unknown key or a value of the wrong type is a `ValueError` that names the key and what is
allowed; invariants are checked once in `Config.validate`. Every run writes its resolved recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Task = Literal["pretrain", "finetune", "probe", "classify", "vae"]
TASKS: tuple[str, ...] = typing.get_args(Task)


@dataclass
class RunConfig:
    task: Task = "pretrain"
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    root: str | None = None  # relative paths of the recipe resolve here (relative to the recipe file); None: cwd
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class LatentConfig:
    space: str = "sd-vae-ft-ema"  # a key of usp.latent.vae.LATENT_SPACES
    path: str | None = None  # hub id, local diffusers folder or checkpoint; None = the space's default
    sample_posterior: bool = False  # False: posterior mean, as the official USP pretraining encodes
    cache: str | None = None  # folder of `usp cache-latents`; None = encode images on the fly
    # On-the-fly encode/decode speed: "fp32" is exact (the paper recipes); "bf16"/"fp16" autocast the VAE
    # (docs/benchmarks.md gives the latent error); channels_last lays its convolutions out as NHWC.
    vae_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    vae_channels_last: bool = False


@dataclass
class DataConfig:
    source: Literal["folder", "fashion_mnist"] = "folder"  # folder: ImageNet layout root/split/class/*.jpg
    root: str | None = None
    split: str = "train"
    eval_split: str = "val"
    image_size: int = 256
    crop: Literal["random_resized", "adm_center", "center"] = "random_resized"
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale (MAE / USP pretraining)
    hflip: bool = True
    normalize: Literal["half", "imagenet"] = "half"  # half: mean = std = 0.5 (USP); imagenet: Table 11 ablation
    limit: int | None = None  # use only the first N images (tiny recipes, debugging)
    num_workers: int = 4
    download: bool = False  # allow torchvision to download Fashion-MNIST when it is not installed
    exclude: str | None = None  # list file of images to leave out (corrupt files found by `usp init`)


@dataclass
class ModelConfig:
    name: str = "vit_b_2"  # a registry key: vit_*, dit_*, sit_*
    init: str | None = None  # pretrained USP checkpoint to transfer from (finetune/probe/classify)
    init_blocks: int | None = None  # transfer only the first N blocks
    pos_interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # when the position grid is resized
    num_classes: int = 1000
    global_pool: bool = True  # classifier: mean of patch tokens (True) or cls token (False)
    drop_path: float = 0.0
    class_dropout: float = 0.1  # DiT/SiT label dropout for classifier-free guidance
    affine_norms: bool = False  # DiT/SiT blocks: True = USP's "VAE-simple" block (receives pretrained norms)
    # Seed of the initial weights (None: run.seed). Varying it alone, with data order, diffusion noise and sample
    # seeds held by run.seed, measures how much a result moves by the random init only (the demo's paired band).
    init_seed: int | None = None


@dataclass
class PretrainConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # per-patch normalised targets
    noise_ablation: bool = False  # paper appendix A: x_t = sqrt(a) x0 + sqrt(1-a) eps, a ~ U[noise_alpha_min, 1)
    noise_alpha_min: float = 0.5


@dataclass
class GenerationConfig:
    method: Literal["ddpm", "transport"] = "ddpm"  # ddpm (DiT) | transport (SiT)
    learn_sigma: bool = True
    path: Literal["linear", "gvp", "vp"] = "linear"  # transport
    prediction: Literal["velocity", "score", "noise"] = "velocity"  # transport
    loss_weight: Literal["velocity", "likelihood"] | None = None  # transport
    train_eps: float | None = None
    sample_eps: float | None = None
    sampler: Literal["ddpm", "ddim", "ode", "sde"] = "ddpm"  # ddpm | ddim (method ddpm); ode | sde (transport)
    sample_steps: str = "250"  # ddpm/ddim respacing ("250", "ddim50"); ode: "dopri5" or a step count for euler/heun
    ode_method: Literal["dopri5", "euler", "heun"] = "dopri5"
    cfg_scale: float = 4.0
    guided_channels: int | None = 3  # public DiT guides the first 3 channels; None = all channels
    # Precision of the network inside sampling (the sampler's own state stays float32): fp32 as the public DiT/SiT
    # samplers run; bf16/fp16 autocast the model only; auto = bf16 on GPU, fp32 on CPU.
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    eval_samples: int = 0  # class-balanced samples generated at each train.eval_every (0: only a grid)
    grid_classes: int = 10  # the sample grid shows this many classes × grid_per_class
    grid_per_class: int = 4
    domain_classifier: str | None = None  # domain FD + class agreement at eval (NOT Inception FID)
    domain_reference: str | None = None  # the real images of that FD: an ADM-format NPZ (arr_0 uint8 N×H×W×3)
    # Guidance interval (Kynkäänniemi et al., NeurIPS 2024): CFG only where the noise level t_noise ∈ [low, high],
    # t_noise 1 = pure noise, 0 = data, both ends included (REPA); elsewhere the model runs conditional only.
    # null = guide at every step. Mapped per sampler by usp.sample.guided.noise_level (docs/conventions.md).
    guidance_interval: tuple[float, float] | None = None
    # A published sampling setting (GENERATION_PRESETS); it fills the generation keys that the recipe file or the
    # override list naming it does not set (see apply_generation_preset).
    preset: Literal["none", "dit", "repa"] = "none"


# What each `generation.preset` sets. dit: DiT's FID-50K setting (Peebles & Xie 2023, Table 4 / sample_ddp.py:
# 250 DDPM steps, cfg 1.5 on 3 of 4 latent channels). repa: REPA's (Yu et al. 2025, README / generate.py: SDE
# Euler–Maruyama, 250 steps, cfg 1.8 on all channels, guidance interval t_noise ∈ [0, 0.7]).
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "dit": {"sampler": "ddpm", "sample_steps": "250", "cfg_scale": 1.5, "guided_channels": 3,
            "guidance_interval": None},
    "repa": {"sampler": "sde", "sample_steps": "250", "cfg_scale": 1.8, "guided_channels": None,
             "guidance_interval": [0.0, 0.7]},
}


def apply_generation_preset(layer: dict[str, Any]) -> dict[str, Any]:
    """Fill the generation keys of one layer (a recipe file's own mapping, or the overrides of one command) from
    the preset that layer names; keys the layer sets itself win. Layers then stack as usual (base < recipe <
    overrides), so a preset replaces what a base recipe or a stored run recipe set. In place; returned."""
    gen = layer.get("generation")
    if not isinstance(gen, dict) or gen.get("preset") in (None, "none"):
        return layer
    if gen["preset"] not in GENERATION_PRESETS:
        raise ValueError(f"generation.preset={gen['preset']!r} is not allowed; choose one of "
                         f"{', '.join(GENERATION_PRESETS)}")
    layer["generation"] = {**GENERATION_PRESETS[gen["preset"]], **gen}
    return layer


@dataclass
class VaeConfig:
    kl_weight: float = 1e-6  # small: a latent space for reconstruction, as LDM's KL-f autoencoders
    latent_channels: int = 8  # the small-f4 latent space expects 8
    width: int = 64
    depth: int = 1
    init_images: int = 4096  # training images whose patch PCA initialises the linear code (0: random init)
    out: str | None = None  # where the trained VAE folder goes; default <run dir>/vae


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars", "sgd"] = "adamw"
    blr: float | None = 1.5e-4  # base lr: lr = blr * global_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 40.0
    layer_decay: float | None = None
    clip_grad: float | None = None
    fused: bool | None = None  # None: fused AdamW (CUDA and CPU kernels); False: torch's foreach loop
    # True: the official MAE/USP pretraining groups, which weight-decay the cls and mask tokens (timm's
    # param_groups_weight_decay); False (default): usp never decays tokens or position tables.
    official_param_groups: bool = False


@dataclass
class ClassifyConfig:
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    randaug: str | None = None  # timm auto-augment string, e.g. rand-m9-mstd0.5-inc1
    random_erasing: float = 0.0
    # LARS probe: the head's lr is multiplied by this / training images, so one epoch moves the head as far
    # as one epoch of the paper's ImageNet probe (LARS steps are a fixed fraction of ‖w‖; see optim.LARS).
    # None: the plain blr × batch / 256 rule.
    lars_reference_images: int | None = 1_281_167


@dataclass
class TrainConfig:
    epochs: float = 800.0
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs)
    global_batch: int = 4096
    accum_steps: int = 1
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    ema_decay: float | None = None
    compile: bool = False
    ckpt_every: int = 1000  # steps
    keep_last: int = 2  # at least 2, so a checkpoint that turns out unreadable has a fallback
    max_skipped_steps: int = 10  # consecutive steps with non-finite gradients (each skipped) before on_nonfinite
    on_nonfinite: Literal["stop", "rollback"] = "stop"  # rollback: newest finite checkpoint, skipping the bad data
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = only at the end (probe/classify)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RepaConfig:
    """REPA (Yu et al., ICLR 2025) on the generation task: align block `depth`'s tokens with a frozen encoder's."""

    enabled: bool = False
    teacher: str = "vit_base_patch14_dinov2"  # a timm ViT name; REPA's default encoder is DINOv2 ViT-B/14
    teacher_weights: str | None = None  # local .safetensors/.pt, or "timm" / "hf-hub:<id>" (timm downloads once)
    teacher_size: int | None = None  # teacher input resolution; REPA: 224 for 256 px images; None: the model's own
    depth: int = 8  # 1-based block whose output is aligned (REPA: 8 for SiT-L/XL, 4 for SiT-B)
    coeff: float = 0.5  # λ of REPA eq. 9 (README `--proj-coeff=0.5`)
    projector_dim: int = 2048  # REPA's projector hidden width
    features: Literal["auto", "cache", "online"] = "auto"  # auto: cached beside latent.cache when set, else online
    features_dir: str | None = None  # folder of the cached tokens; None: <latent.cache>/repa-<teacher>-<weights>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def validate(self) -> Config:
        samplers = ("ddpm", "ddim") if self.generation.method == "ddpm" else ("ode", "sde")
        if self.generation.preset != "none" and self.generation.sampler not in samplers:
            raise ValueError(f"generation.preset={self.generation.preset} samples with "
                             f"{self.generation.sampler}, which a generation.method={self.generation.method} model "
                             f"cannot use ({', '.join(samplers)}): choose the other preset, or preset none")
        _choice("generation.sampler", self.generation.sampler, samplers)
        interval = self.generation.guidance_interval
        if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"generation.guidance_interval must be [low, high] with 0 <= low <= high <= 1 (noise "
                             f"level: 1 = pure noise, 0 = data), or null to guide every step; got {list(interval)}")
        if not 0.0 <= self.pretrain.mask_ratio < 1.0:
            raise ValueError(f"pretrain.mask_ratio must be in [0, 1), got {self.pretrain.mask_ratio}")
        if not 0.0 < self.pretrain.noise_alpha_min <= 1.0:
            raise ValueError(f"pretrain.noise_alpha_min must be in (0, 1], got {self.pretrain.noise_alpha_min}")
        if self.train.global_batch < 1 or self.train.accum_steps < 1:
            raise ValueError("train.global_batch and train.accum_steps must be at least 1")
        if self.train.global_batch % self.train.accum_steps:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} is not divisible by "
                f"train.accum_steps={self.train.accum_steps}"
            )
        if self.generation.domain_classifier and not self.generation.domain_reference:
            raise ValueError("generation.domain_classifier needs generation.domain_reference: an NPZ of real images "
                             "(arr_0 uint8 N×H×W×3) for the FD, e.g. written by `usp reference`")
        if self.optim.lr is None and self.optim.blr is None:
            raise ValueError("set optim.blr (lr = blr * global_batch / 256) or optim.lr")
        if self.train.ema_decay is not None and not 0.0 < self.train.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.train.ema_decay}")
        if self.train.max_steps is not None and self.train.max_steps <= 0:
            raise ValueError(f"train.max_steps must be at least 1 (or null to use train.epochs), got "
                             f"{self.train.max_steps}")
        if self.train.max_steps is None and self.train.epochs <= 0:
            raise ValueError(f"train.epochs must be positive, got {self.train.epochs}")
        if self.train.max_skipped_steps < 1:
            raise ValueError(f"train.max_skipped_steps must be at least 1, got {self.train.max_skipped_steps}")
        if min(self.train.ckpt_every, self.train.log_every) < 1 or self.train.eval_every < 0:
            raise ValueError("train.ckpt_every and train.log_every must be at least 1, train.eval_every at least 0")
        if self.repa.enabled and not (self.repa.depth >= 1 and self.repa.coeff > 0 and self.repa.projector_dim >= 1):
            raise ValueError(f"repa.depth (>= 1), repa.coeff (> 0) and repa.projector_dim (>= 1) are out of range: "
                             f"{self.repa.depth}, {self.repa.coeff}, {self.repa.projector_dim}")
        if self.repa.enabled and self.repa.features == "cache" and not self.latent.cache:
            raise ValueError("repa.features=cache needs latent.cache (the tokens live beside the latents); set "
                             "repa.features=online to run the teacher on the training images")
        if self.train.keep_last < 1:
            raise ValueError("train.keep_last must be at least 1 (the last good checkpoint is never deleted)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def lr(self) -> float:
        """Peak learning rate: absolute `optim.lr`, else blr × global_batch / 256 (MAE's rule)."""
        if self.optim.lr is not None:
            return self.optim.lr
        return self.optim.blr * self.train.global_batch / 256

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`; return it converted (int→float, list→tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):  # e.g. sample_steps: 250
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.')} must be a mapping of {', '.join(names)}")
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix}{key}; allowed under {prefix or 'the top level'}: "
                             f"{', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(values: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set each dotted `key=value` in the nested dict `values` (in place; returned for chaining)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return values


def config_from_dict(values: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """A validated Config from a nested dict (e.g. the recipe stored in a checkpoint) plus overrides.

    A `generation.preset` named in `values` fills the keys `values` lacks; one named in the overrides is laid
    over `values` first, under the overrides themselves (apply_generation_preset)."""
    values = apply_generation_preset(values)
    preset = apply_generation_preset(apply_overrides({}, overrides)).get("generation")
    if isinstance(preset, dict) and preset.get("preset") not in (None, "none"):
        values = _merge(values, {"generation": {k: v for k, v in preset.items() if k != "preset"}})
    return _build(Config, apply_overrides(values, overrides), "").validate()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a key of `top` replaces the same key of `base`)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipes_dir() -> Path:
    """The shipped recipes: `usp/recipes` in an installed wheel (package data), the repository's configs/ in a
    source checkout (the wheel build copies configs/ there; see setup.py)."""
    package = Path(__file__).resolve().parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "configs"


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given when it exists, else a shipped recipe by name: `fmnist/pretrain`,
    `fmnist/pretrain.yaml` and `configs/fmnist/pretrain.yaml` all name configs/fmnist/pretrain.yaml."""
    path = Path(name)
    if path.is_file():
        return path
    relative = path.as_posix().removeprefix("configs/")
    for candidate in (relative, relative + ".yaml"):
        shipped = recipes_dir() / candidate
        if not path.is_absolute() and shipped.is_file():
            return shipped
    raise FileNotFoundError(f"recipe {name} not found, neither as a file nor among the shipped recipes in "
                            f"{recipes_dir()}; `usp list recipes` names them (e.g. fmnist/pretrain)")


# Recipe keys that hold paths: with run.root set they resolve against it (so a run works from any directory).
PATH_KEYS = ("run.out_dir", "latent.path", "latent.cache", "data.root", "data.exclude", "model.init",
             "generation.domain_classifier", "generation.domain_reference", "vae.out", "repa.teacher_weights",
             "repa.features_dir")


def resolve_paths(values: dict[str, Any], recipe: Path) -> dict[str, Any]:
    """Make the relative paths of a recipe dict absolute against its `run.root` (itself relative to the recipe
    file), in place; a recipe without run.root is left as it is (paths relative to the working directory).
    `latent.path` may be a hub id (owner/name): it is resolved only when written ./x or ../x, or when it exists."""
    root = (values.get("run") or {}).get("root")
    if root is None:
        return values
    root = (recipe.parent / Path(root).expanduser()).resolve()
    values["run"]["root"] = str(root)
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = values.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(name), str):
            continue
        text = node[name]
        path = Path(text).expanduser()
        if path.is_absolute():
            continue
        if key == "latent.path" and not (text.startswith(("./", "../")) or (root / path).exists()):
            continue
        if key == "repa.teacher_weights" and (text == "timm" or text.startswith("hf-hub:")):  # timm downloads these
            continue
        node[name] = str((root / path).resolve())
    return values


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a nested dict, with `base: other.yaml` (relative to the file) resolved and merged under it."""
    path = Path(path)
    if not path.is_file():
        path = find_recipe(path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of sections (run:, data:, ...)")
    apply_generation_preset(values)  # this file's preset, under this file's keys, over its base's
    base = values.pop("base", None)
    if base is None:
        return values
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ValueError(f"recipe {path}: `base: {base}` makes a cycle ({' -> '.join(map(str, _seen))})")
    return _merge(read_recipe(base_path, (*_seen, base_path)), values)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults) and apply dotted overrides, then validate."""
    values = {}
    if path is not None:
        path = find_recipe(path)
        values = resolve_paths(read_recipe(path, (path.resolve(),)), path)
    return config_from_dict(values, overrides)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())

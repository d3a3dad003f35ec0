"""The recipe's typed sections: one dataclass per YAML section, the generation presets, and the checks of
`Config.validate` (loading, overrides and `base:` live in usp.config.loading)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TaskName = Literal["pretrain", "finetune", "probe", "classify", "vae"]
TASKS: tuple[str, ...] = typing.get_args(TaskName)
# The linear probe's floor on steps. Measured (docs/probe_small_data.md): the paper's probe (batch 1 024, 10
# epochs) on 1 500 Fashion-MNIST images takes 10 steps and reaches 57.8 % top-1 against 73.0 % of logistic
# regression on the same frozen features; stretched to 100 / 500 steps at the same summed lr: 70.2 / 74.6 %.
PROBE_MIN_STEPS = 500


@dataclass
class RunConfig:
    task: TaskName = "pretrain"
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
    # Images per VAE encode/decode call, per rank: every larger batch (a training micro-batch encoded on the fly,
    # a cache build, a sample grid) is split into calls of this size, so the VAE's activations stay bounded
    # (SD-VAE fp32 on CPU: ~165 MB per 256 px image to encode, ~200 MB to decode; 512 px: 4×).
    vae_batch: int = 8


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
    # LightningDiT's block options, for lightningdit_* and the vit_*_lightning encoder (wo_shift: lightningdit_*
    # only); null = the registry's, i.e. the released VA-VAE models' (SwiGLU, RoPE, RMSNorm on; qk-norm, wo_shift off).
    use_swiglu: bool | None = None
    use_rope: bool | None = None
    use_rmsnorm: bool | None = None
    use_qknorm: bool | None = None
    wo_shift: bool | None = None

    def block_options(self) -> dict[str, bool]:
        """The LightningDiT options this recipe sets (the others keep the registry's defaults)."""
        return {k: getattr(self, k) for k in LIGHTNING_OPTION_KEYS if getattr(self, k) is not None}


LIGHTNING_OPTION_KEYS = ("use_swiglu", "use_rope", "use_rmsnorm", "use_qknorm", "wo_shift")


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
    sample_steps: str = "250"  # ddpm/ddim respacing ("250", "ddim50"); ode: Euler/Heun steps (dopri5: ignored)
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
    # null = guide at every step. Mapped by the objective's noise_level (usp.diffusion.objective, docs/conventions.md).
    guidance_interval: tuple[float, float] | None = None
    # A published sampling setting (GENERATION_PRESETS); it fills the generation keys that the recipe file or the
    # override list naming it does not set (see apply_generation_preset).
    preset: Literal["none", "dit", "repa", "lightningdit"] = "none"
    # The time the network is trained and sampled in (usp.diffusion.time): sit (t = 0 noise, 1 data; usp's own) or
    # repa (t = 0 data, 1 noise, velocity sign flipped: REPA's checkpoints). A property of the weights, so no
    # sampling preset sets it. Transport only.
    time: Literal["sit", "repa"] = "sit"
    # LightningDiT's transport options (usp.diffusion.lightning), for any transport model: training times uniform
    # (SiT) or logit-normal, t = sigmoid(N(0, 1)) (LightningDiT use_lognorm); the cosine velocity loss added to the
    # MSE (use_cosine_loss; both are logged); the ODE grid shifted t -> s·t / (1 + (s − 1)·t) for s > 0 (0 = none).
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    cosine_loss: bool = False
    timestep_shift: float = 0.0


# The samplers of each generation.method (usp.diffusion's objectives implement them; a test keeps the two equal).
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddpm", "ddim"), "transport": ("ode", "sde")}

# What each `generation.preset` sets. dit: DiT's FID-50K setting (Peebles & Xie 2023, Table 4 / sample_ddp.py:
# 250 DDPM steps, cfg 1.5 on 3 of 4 latent channels). repa: REPA's (Yu et al. 2025, README / generate.py: SDE
# Euler–Maruyama, 250 steps, cfg 1.8 on all channels, guidance interval t_noise ∈ [0, 0.7]).
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "dit": {"sampler": "ddpm", "sample_steps": "250", "cfg_scale": 1.5, "guided_channels": 3,
            "guidance_interval": None},
    "repa": {"sampler": "sde", "sample_steps": "250", "cfg_scale": 1.8, "guided_channels": None,
             "guidance_interval": [0.0, 0.7]},
    # lightningdit: LightningDiT's 64-epoch VA-VAE sampler (configs/reproductions/lightningdit_xl_vavae_f16d32_64ep_cfg
    # .yaml, FID 2.11 at cfg 10): ODE Euler, num_sampling_steps 250 = 250 grid points = 249 steps (usp counts steps),
    # timestep_shift 0.3, cfg 10 on channels 0–2 (forward_with_cfg's `eps[:, :3]`), cfg_interval_start 0.10: guided
    # iff SiT t ≥ 0.10, i.e. noise level ≤ 0.9. (Its 800-epoch setting: cfg 6.7; config_details.yaml: start 0.11.)
    "lightningdit": {"sampler": "ode", "ode_method": "euler", "sample_steps": "249", "timestep_shift": 0.3,
                     "cfg_scale": 10.0, "guided_channels": 3, "guidance_interval": [0.0, 0.9]},
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
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU and on CPUs with native bf16
    ema_decay: float | None = None
    compile: bool = False
    ckpt_every: int = 1000  # steps
    keep_last: int = 2  # at least 2, so a checkpoint that turns out unreadable has a fallback
    max_skipped_steps: int = 10  # consecutive steps with non-finite gradients (each skipped) before on_nonfinite
    on_nonfinite: Literal["stop", "rollback"] = "stop"  # rollback: newest finite checkpoint, skipping the bad data
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = only at the end (probe/classify)
    eval_batch: int = 64  # items per rank in each no-grad pass: evaluation, feature extraction, sample grids
    # A floor on the steps of an epoch-based run (usp.train.engine.Plan: finer steps, same summed lr); None: the
    # task's default, PROBE_MIN_STEPS for the linear probe (its paper schedule assumes ImageNet's 7 000 steps), else 0.
    min_steps: int | None = None
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
        samplers = SAMPLERS[self.generation.method]
        if self.generation.preset != "none" and self.generation.sampler not in samplers:
            raise ValueError(f"generation.preset={self.generation.preset} samples with "
                             f"{self.generation.sampler}, which a generation.method={self.generation.method} model "
                             f"cannot use ({', '.join(samplers)}): choose the other preset, or preset none")
        _choice("generation.sampler", self.generation.sampler, samplers)
        gen = self.generation
        lightning_keys = {"t_sampling": gen.t_sampling != "uniform", "cosine_loss": gen.cosine_loss,
                          "timestep_shift": gen.timestep_shift != 0.0}
        if gen.method != "transport" and any(lightning_keys.values()):
            raise ValueError(f"generation.{', generation.'.join(k for k, v in lightning_keys.items() if v)} "
                             "applies to transport training/sampling; generation.method=ddpm: remove it")
        if gen.timestep_shift < 0:
            raise ValueError(f"generation.timestep_shift must be > 0 (0 = no shift), got {gen.timestep_shift}")
        if self.generation.cosine_loss and self.generation.prediction != "velocity":
            raise ValueError("generation.cosine_loss compares velocities (LightningDiT): it needs "
                             "generation.prediction=velocity")
        if self.generation.time != "sit" and self.generation.method != "transport":
            raise ValueError(f"generation.time={self.generation.time} is a transport time convention; "
                             "generation.method=ddpm counts DDPM steps: remove generation.time")
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
        if self.train.eval_batch < 1 or self.latent.vae_batch < 1:
            raise ValueError(f"train.eval_batch and latent.vae_batch must be at least 1, got {self.train.eval_batch} "
                             f"and {self.latent.vae_batch}")
        options = self.model.block_options()
        lightning = self.model.name.startswith("lightningdit_") or self.model.name.endswith("_lightning")
        if options and not lightning:
            raise ValueError(f"model.{', model.'.join(options)} applies to LightningDiT's blocks (lightningdit_*, "
                             f"vit_*_lightning), not to model.name={self.model.name}; remove it or choose such a model")
        if "wo_shift" in options and not self.model.name.startswith("lightningdit_"):
            raise ValueError("model.wo_shift removes adaLN shifts, which only lightningdit_* has; remove it")
        if self.train.keep_last < 1:
            raise ValueError("train.keep_last must be at least 1 (the last good checkpoint is never deleted)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @property
    def min_steps(self) -> int:
        if self.train.min_steps is not None:
            return self.train.min_steps
        return PROBE_MIN_STEPS if self.run.task == "probe" else 0

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

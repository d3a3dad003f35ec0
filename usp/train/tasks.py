"""What differs per task: the model, the dataset, the per-sample randomness and the loss of a batch.

Each task is built from a recipe and handed to `usp.train.engine.train`. The data path is shared:
cached latents when `latent.cache` is set (moments of the image and its flip), else images encoded
on the fly by the frozen VAE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from usp.config import Config
from usp.data.images import build_image_dataset, build_transform
from usp.latent.cache import LatentCacheDataset
from usp.latent.vae import LatentSpace, moments_to_latents, scale_and_shift, spec_of
from usp.models.mae import build_mae


class LatentData:
    """The shared latent input path of every task on latents.

    Cached: items carry moments (2, 2C, h, w) and the task picks plain/flipped by a per-sample coin.
    On the fly: items carry images, which the frozen VAE encodes on the training device.
    """

    def __init__(self, config: Config, split: str, augment: bool, crop: str | None = None, transform=None):
        lc, dc = config.latent, config.data
        self.spec = spec_of(lc.space)
        self.latent_size = dc.image_size // self.spec.factor
        if dc.image_size % self.spec.factor:
            raise ValueError(f"data.image_size={dc.image_size} is not divisible by the {lc.space} VAE factor "
                             f"{self.spec.factor}; use {self.latent_size * self.spec.factor or self.spec.factor}")
        self.sample_posterior, self.augment = lc.sample_posterior, augment
        self.vae: LatentSpace | None = None
        if lc.cache:
            if transform is not None:
                raise ValueError("this recipe augments images (classify.randaug / random_erasing), which a latent "
                                 "cache cannot do: unset latent.cache to encode augmented images on the fly")
            self.dataset = LatentCacheDataset(lc.cache, split, lc.space, dc.image_size, dc.limit)
            self.scale, self.shift = scale_and_shift(lc.space, lc.path)
        else:
            transform = transform or build_transform(dc.image_size, crop or (dc.crop if augment else "center"),
                                                     dc.crop_scale, dc.hflip and augment, dc.normalize)
            self.dataset = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download)
            self.vae = LatentSpace.load(lc.space, lc.path)
            self.scale, self.shift = self.vae.scale, self.vae.shift

    @property
    def cached(self) -> bool:
        return self.vae is None

    def extras(self) -> dict:
        """Per-sample randomness of the latent itself: the flip coin and the posterior noise."""
        out = {}
        if self.cached:
            out["flip"] = torch.rand(()) < 0.5 if self.augment else torch.tensor(False)
        if self.sample_posterior:
            out["posterior_eps"] = torch.randn(self.spec.channels, self.latent_size, self.latent_size)
        return out

    def eval_batches(self, indices: list[int], batch_size: int, device: torch.device | str = "cpu"):
        """Unaugmented batches (plain, never flipped) of the given items, for evaluation and feature extraction."""
        for start in range(0, len(indices), batch_size):
            items = [self.dataset[i] for i in indices[start : start + batch_size]]
            batch = {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device) for k in items[0]}
            if self.cached:
                batch["flip"] = torch.zeros(len(items), dtype=torch.bool, device=device)
            yield batch

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's scaled latents (N, C, h, w) on the batch's device."""
        eps = batch.get("posterior_eps")
        if self.cached:
            moments = batch["moments"]  # (N, 2, 2C, h, w)
            pick = batch["flip"].long().view(-1, 1, 1, 1, 1).expand(-1, 1, *moments.shape[2:])
            moments = moments.gather(1, pick).squeeze(1)  # (N, 2C, h, w)
            return moments_to_latents(moments, self.scale, self.shift, eps)
        if self.vae.vae.device != batch["image"].device:  # diffusers' module knows its device
            self.vae.to(batch["image"].device)
        with torch.autocast(batch["image"].device.type, enabled=False):
            return self.vae.encode(batch["image"].float(), eps)


class PretrainTask:
    """USP pretraining: masked latent modeling (optionally with the appendix-A noise ablation)."""

    def __init__(self, config: Config):
        self.config = config
        self.data = LatentData(config, config.data.split, augment=True)
        self.train_set = self.data.dataset
        self.model = build_mae(config.model.name, latent_size=self.data.latent_size,
                               in_channels=self.data.spec.channels, norm_pix_loss=config.pretrain.norm_pix_loss)
        self.num_patches = self.model.num_patches

    def extras(self) -> dict:
        out = self.data.extras()
        out["mask_noise"] = torch.rand(self.num_patches)
        if self.config.pretrain.noise_ablation:
            low = self.config.pretrain.noise_alpha_min
            out["alpha"] = low + (1 - low) * torch.rand(())  # a ~ U[low, 1)
            out["noise"] = torch.randn(self.data.spec.channels, self.data.latent_size, self.data.latent_size)
        return out

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        clean = self.data.latents(batch)  # (N, C, h, w)
        inputs = clean
        if "alpha" in batch:  # appendix A: noisy input, clean target
            alpha = batch["alpha"].view(-1, 1, 1, 1)
            inputs = alpha.sqrt() * clean + (1 - alpha).sqrt() * batch["noise"]
        loss, _, _ = model(inputs, self.config.pretrain.mask_ratio, target=clean, noise=batch["mask_noise"])
        return {"loss": loss}


class VAETask:
    """Train the small KL autoencoder of a latent space for small data (`usp train-vae`)."""

    def __init__(self, config: Config):
        from usp.latent.small_vae import SmallVAE

        self.config = config
        dc = config.data
        transform = build_transform(dc.image_size, "center", hflip=dc.hflip, normalize="half")
        self.train_set = build_image_dataset(dc.source, dc.root, dc.split, transform, dc.limit, dc.download)
        vc = config.vae
        self.model = SmallVAE(latent_channels=vc.latent_channels, width=vc.width, depth=vc.depth)
        if vc.init_images:  # a resumed run overwrites this with its checkpoint
            count = min(vc.init_images, len(self.train_set))
            self.model.init_from_data(torch.stack([self.train_set[i]["image"] for i in range(count)]))

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        recon, posterior = model(images)
        mse = F.mse_loss(recon, images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, to be comparable with the MSE
        return {"loss": mse + self.config.vae.kl_weight * kl, "mse": mse, "kl": kl}

    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """At the end: PSNR on the evaluation split, latent statistics, and the VAE folder."""
        if not final:
            return {}
        dc = self.config.data
        test = build_image_dataset(dc.source, dc.root, dc.eval_split, build_transform(
            dc.image_size, "center", hflip=False, normalize="half"), limit=dc.limit, download=dc.download)
        model.eval()
        device = next(model.parameters()).device
        mse_sum, count, means = 0.0, 0, []
        with torch.no_grad():
            for start in range(0, len(test), 500):
                images = torch.stack([test[i]["image"] for i in range(start, min(start + 500, len(test)))]).to(device)
                mean = model.encode(images).latent_dist.mean
                recon = model.decode(mean).sample.clamp(-1, 1)
                # PSNR in [0, 1] units: the [-1, 1] range has peak-to-peak 2, so MSE/4.
                mse_sum += ((recon - images) ** 2).mean(dim=(1, 2, 3)).div(4).sum().item()
                count += len(images)
                means.append(mean.cpu())
        mse = mse_sum / count
        psnr = 10 * math.log10(1.0 / mse)
        latents = torch.cat(means)
        stats = {"scale": 1.0 / latents.std().item(), "shift": latents.mean().item(), "psnr_test": psnr}
        if runtime.is_main:
            out = Path(self.config.vae.out or run_dir / "vae")
            model.save_pretrained(str(out))
            (out / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        return {"psnr_test": psnr, "latent_scale": stats["scale"]}


class FinetuneTask:
    """DiT (DDPM, learned sigma) or SiT (transport) fine-tuning, from USP weights or from scratch."""

    def __init__(self, config: Config):
        from usp.diffusion import create_diffusion, create_transport
        from usp.models.dit import build_dit
        from usp.models.transfer import load_state_dict_file, transfer_weights

        self.config, gen = config, config.generation
        self.data = LatentData(config, config.data.split, augment=True, crop="adm_center")
        self.train_set = self.data.dataset
        side, channels = self.data.latent_size, self.data.spec.channels
        self.latent_shape = (channels, side, side)
        self.model = build_dit(config.model.name, input_size=side, in_channels=channels,
                               num_classes=config.model.num_classes, class_dropout_prob=config.model.class_dropout,
                               learn_sigma=gen.learn_sigma, affine_norms=config.model.affine_norms)
        self.transfer_report = None
        if config.model.init:
            self.transfer_report = transfer_weights(load_state_dict_file(config.model.init), self.model,
                                                    num_blocks=config.model.init_blocks,
                                                    interpolation=config.model.pos_interpolation)
            config.run_dir.mkdir(parents=True, exist_ok=True)
            self.transfer_report.save(config.run_dir / "transfer.json")
        if gen.method == "ddpm":
            self.diffusion = create_diffusion(None, learn_sigma=gen.learn_sigma)
        else:
            self.transport = create_transport(gen.path, gen.prediction, gen.loss_weight, gen.train_eps, gen.sample_eps)
        self._decoder: LatentSpace | None = self.data.vae
        self._domain = None

    def extras(self) -> dict:
        out = self.data.extras()
        out["noise"] = torch.randn(self.latent_shape)
        if self.config.generation.method == "ddpm":
            out["t"] = torch.randint(0, self.diffusion.num_timesteps, ())
        else:
            t0, t1 = self.transport.interval()
            out["t"] = t0 + (t1 - t0) * torch.rand(())
        return out

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x, labels = self.data.latents(batch), batch["label"]
        model_fn = lambda x_t, t: model(x_t, t, labels)  # noqa: E731
        objective = self.diffusion if self.config.generation.method == "ddpm" else self.transport
        losses = objective.training_losses(model_fn, x, t=batch["t"], noise=batch["noise"])
        return {key: value.mean() for key, value in losses.items()}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._decoder is None:
            self._decoder = LatentSpace.load(self.config.latent.space, self.config.latent.path)
        self._decoder.to(latents.device)
        return self._decoder.decode(latents)

    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """A class-conditional sample grid (CFG), and domain metrics of class-balanced samples if configured."""
        from usp.generate import sample_images, save_grid

        if not runtime.is_main:
            return {}
        gen, seed = self.config.generation, self.config.run.seed
        model.eval()
        classes = min(gen.grid_classes, self.config.model.num_classes)
        # Grid: row = sample index within class, column = class; the same seeds at every step.
        indices = [r * classes + c for r in range(gen.grid_per_class) for c in range(classes)]
        images, _ = sample_images(model, self.decode, gen, indices, seed, classes, True, self.latent_shape)
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=classes)
        if not (gen.eval_samples and gen.domain_classifier):
            return {}
        from usp.evaluate.domain import DomainEvaluator, domain_metrics

        if self._domain is None:  # the real side is fixed: its statistics are computed once
            from usp.data.fashion_mnist import load_fashion_mnist, to_rgb32

            self._domain = DomainEvaluator.load(gen.domain_classifier)
            self._real_stats = self._domain.statistics(to_rgb32(load_fashion_mnist(self.config.data.root, "test")[0]))
        fake, labels = sample_images(model, self.decode, gen, list(range(gen.eval_samples)), seed + 10**7,
                                     self.config.model.num_classes, True, self.latent_shape, batch_size=250)
        return domain_metrics(self._domain, fake, labels, self._real_stats)


def build_classifier(config: Config, latent_size: int, channels: int) -> nn.Module:
    """A ViT classifier of the encoder size named by model.name (vit_<size>_<patch>), USP weights transferred."""
    from usp.models.mae import ENCODER_SIZES
    from usp.models.transfer import load_state_dict_file, transfer_weights
    from usp.models.vit import VisionTransformer

    try:
        _, size, patch = config.model.name.split("_")
        dims = ENCODER_SIZES[size]
    except (ValueError, KeyError) as err:
        raise ValueError(f"model.name={config.model.name!r} is not a ViT encoder name such as vit_b_2") from err
    model = VisionTransformer(latent_size=latent_size, in_channels=channels, patch_size=int(patch),
                              num_classes=config.model.num_classes, global_pool=config.model.global_pool,
                              drop_path_rate=config.model.drop_path, **dims)
    if config.model.init:
        report = transfer_weights(load_state_dict_file(config.model.init), model, num_blocks=config.model.init_blocks,
                                  interpolation=config.model.pos_interpolation)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        report.save(config.run_dir / "transfer.json")
    return model


class ClassifierTask:
    """ViT classification on latents: the linear probe (`usp probe`, frozen encoder, BN + linear head,
    LARS) or full fine-tuning (`usp classify`, layer-wise lr decay, mixup/cutmix, label smoothing)."""

    def __init__(self, config: Config):
        from usp.understanding import build_mixup, prepare_linear_probe

        self.config, self.probe = config, config.run.task == "probe"
        cc, dc = config.classify, config.data
        transform = None
        if not self.probe and (cc.randaug or cc.random_erasing):
            from timm.data import create_transform

            from usp.data.images import IMAGENET_MEAN, IMAGENET_STD

            mean, std = ((0.5,) * 3, (0.5,) * 3) if dc.normalize == "half" else (IMAGENET_MEAN, IMAGENET_STD)
            transform = create_transform(dc.image_size, is_training=True, auto_augment=cc.randaug,
                                         re_prob=cc.random_erasing, interpolation="bicubic", mean=mean, std=std,
                                         scale=dc.crop_scale, hflip=0.5 if dc.hflip else 0.0)
        self.data = LatentData(config, config.data.split, augment=True, transform=transform)
        self.train_set = self.data.dataset
        self.model = build_classifier(config, self.data.latent_size, self.data.spec.channels)
        if self.probe:
            prepare_linear_probe(self.model, config.model.num_classes)
        self.mixup, self.criterion = build_mixup(mixup_alpha=cc.mixup, cutmix_alpha=cc.cutmix,
                                                 label_smoothing=cc.label_smoothing,
                                                 num_classes=config.model.num_classes)
        self._eval_data: LatentData | None = None

    def param_groups(self) -> list[dict]:
        from usp.train.optim import param_groups

        if self.config.optim.layer_decay is None:
            return param_groups(self.model, self.config.optim.weight_decay)
        return param_groups(self.model, self.config.optim.weight_decay, layer_decay=self.config.optim.layer_decay,
                            num_layers=self.model.num_layers)

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        from usp.understanding import set_probe_train_mode

        if self.probe:  # frozen encoder in eval mode; only the head's BatchNorm collects statistics
            set_probe_train_mode(model.module if hasattr(model, "module") else model)
        x, labels = self.data.latents(batch), batch["label"]
        if self.mixup is not None:
            x, targets = self.mixup(x, labels)
        else:
            targets = labels
        logits = model(x)
        return {"loss": self.criterion(logits, targets)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """Top-1 / top-5 on the evaluation split (centre crop, posterior mean), sharded across ranks."""
        import torch.distributed as dist

        if self._eval_data is None:
            self._eval_data = LatentData(self.config, self.config.data.eval_split, augment=False)
        data = self._eval_data
        device = next(model.parameters()).device
        model.eval()
        correct, total = torch.zeros(2, device=device), torch.zeros((), device=device)
        for batch in data.eval_batches(list(range(runtime.rank, len(data.dataset), runtime.world_size)), 256, device):
            logits = model(data.latents(batch))
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch["label"].view(-1, 1)
            correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
            total += len(hits)
        if runtime.world_size > 1:
            dist.all_reduce(correct)
            dist.all_reduce(total)
        return {"top1": 100 * correct[0].item() / total.item(), "top5": 100 * correct[1].item() / total.item()}


TASK_BUILDERS = {"pretrain": PretrainTask, "vae": VAETask, "finetune": FinetuneTask, "probe": ClassifierTask,
                 "classify": ClassifierTask}


def build_task(config: Config):
    if config.run.task not in TASK_BUILDERS:
        raise ValueError(f"run.task={config.run.task!r} has no task yet; available: {', '.join(TASK_BUILDERS)}")
    torch.manual_seed(config.run.seed)  # the model's initialisation depends on the recipe's seed only
    return TASK_BUILDERS[config.run.task](config)

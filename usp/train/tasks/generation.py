"""Generation training: DiT (DDPM, learned sigma) or SiT (transport), from USP weights or from scratch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from usp.config import Config
from usp.diffusion.time import in_sit_time
from usp.latent.data import LatentData
from usp.latent.vae import LatentSpace
from usp.sample.run import build_generator


class GenerationTask:
    """DiT (DDPM, learned sigma) or SiT (transport) fine-tuning, from USP weights or from scratch."""

    def __init__(self, config: Config):
        from usp.diffusion import build_objective
        from usp.models.transfer import transfer_weights
        from usp.run.weights import load_weights

        self.config, gen = config, config.generation
        self.data = LatentData(config, config.data.split, augment=True, crop="adm_center")
        self.train_set = self.data.dataset
        side, channels = self.data.latent_size, self.data.spec.channels
        self.latent_shape = (channels, side, side)
        self.model = build_generator(config)
        self.transfer_report = None
        if config.model.init:
            self.transfer_report = transfer_weights(load_weights(config.model.init)[0], self.model,
                                                    num_blocks=config.model.init_blocks,
                                                    interpolation=config.model.pos_interpolation)
            config.run_dir.mkdir(parents=True, exist_ok=True)
            self.transfer_report.save(config.run_dir / "transfer.json")
            if os.environ.get("RANK", "0") == "0":  # what the user's checkpoint gave, once per run
                print(self.transfer_report.summary(), flush=True)
        self.objective = build_objective(gen)  # DDPM (DiT) or transport (SiT), as the recipe says
        self._decoder: LatentSpace | None = self.data.vae
        self._domain = None
        self.teacher = None
        if config.repa.enabled:
            self._setup_repa(config)

    def _setup_repa(self, config: Config) -> None:
        """REPA: the frozen teacher, the projector on the generator (after the USP transfer, which it is no part
        of), and the teacher tokens: cached beside the latents, or computed from the training images."""
        from usp.latent.features import RepaFeatureDataset, cached_with_images, load_repa_teacher, recipe_features_dir
        from usp.models.repa import attach_projectors

        rc = config.repa
        if rc.depth > self.model.depth:
            raise ValueError(f"repa.depth={rc.depth} but {config.model.name} has {self.model.depth} blocks; "
                             f"choose 1..{self.model.depth}")
        self.teacher = load_repa_teacher(rc.teacher, rc.teacher_weights, rc.teacher_size)
        self.repa_grid = self.model.grid_size
        if self.teacher.grid != self.repa_grid and os.environ.get("RANK", "0") == "0":
            print(f"repa: teacher {rc.teacher} gives a {self.teacher.grid}x{self.teacher.grid} token grid; its tokens "
                  f"are interpolated to the generator's {self.repa_grid}x{self.repa_grid}", flush=True)
        attach_projectors(self.model, [self.teacher.dim], rc.projector_dim)
        self.repa_cached = rc.features == "cache" or (rc.features == "auto" and self.data.cached)
        if self.repa_cached:
            if not self.data.cached:
                raise ValueError("repa.features=cache needs latent.cache; set repa.features=online")
            folder = recipe_features_dir(config)
            self.train_set = RepaFeatureDataset(self.data.dataset, folder, config.data.split, self.teacher,
                                                self.repa_grid)
        elif config.data.normalize != "half":
            raise ValueError("repa.features=online expects images in [-1, 1] (data.normalize=half); the teacher "
                             "applies its own normalisation")
        elif self.data.cached:  # cached latents, teacher online: each latent comes with its image
            self.train_set = cached_with_images(config, self.data.dataset, config.data.split)

    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The sampling weights: the generator alone (REPA's projector is a training-time head)."""
        from usp.models.repa import strip_projectors

        return strip_projectors(model.state_dict())

    def _repa_targets(self, batch: dict) -> torch.Tensor:
        """(N, T, D) teacher tokens of the batch's images, flipped where its latents are."""
        from usp.models.repa import match_grid

        if self.repa_cached:
            tokens = batch["repa"]  # (N, 2, T, D): [plain, flipped] as the latent cache
            pick = batch["flip"].long().view(-1, 1, 1, 1).expand(-1, 1, *tokens.shape[2:])
            return tokens.gather(1, pick).squeeze(1)  # (N, T, D)
        images = batch["image"]  # (N, 3, H, W)
        if self.data.cached:  # unflipped images beside cached latents: flip those whose latent is the flipped one
            images = torch.where(batch["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
        self.teacher.to(images.device)
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                             enabled=images.device.type == "cuda"):
            return match_grid(self.teacher.tokens(images), self.repa_grid).float()  # (N, T, D)

    def extras(self) -> dict:
        out = self.data.extras()
        out["noise"] = torch.randn(self.latent_shape)
        out["t"] = self.objective.sample_t()
        return out

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x, labels = self.data.latents(batch), batch["label"]
        net = in_sit_time(model, self.config.generation.time)  # the objective speaks SiT time
        if self.teacher is None:
            model_fn = lambda x_t, t: net(x_t, t, labels)  # noqa: E731
            losses = self.objective.training_losses(model_fn, x, t=batch["t"], noise=batch["noise"])
            return {key: value.mean() for key, value in losses.items()}
        from usp.models.repa import projection_loss

        hidden: list[torch.Tensor] = []

        def with_hidden(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out, h = model(x_t, t, y, return_hidden=self.config.repa.depth)
            hidden.append(h)  # (N, T, D) after block repa.depth, on the noisy input (REPA eq. 8)
            return out

        model_fn = lambda x_t, t: in_sit_time(with_hidden, self.config.generation.time)(x_t, t, labels)  # noqa: E731

        losses = {key: value.mean() for key, value in self.objective.training_losses(
            model_fn, x, t=batch["t"], noise=batch["noise"]).items()}
        targets = self._repa_targets(batch)  # (N, T, D_teacher)
        projected = [projector(hidden[-1]) for projector in self.model.projectors]  # each (N, T, D_teacher)
        repa = projection_loss(projected, [targets] * len(projected))
        # REPA eq. 9: the generation loss + λ·L_REPA; both are logged on their own.
        return {**losses, "loss": losses["loss"] + self.config.repa.coeff * repa, "base_loss": losses["loss"],
                "repa_loss": repa}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._decoder is None:
            self._decoder = LatentSpace.load(self.config.latent.space, self.config.latent.path,
                                             cache=self.config.latent.cache, max_batch=self.config.latent.vae_batch)
        self._decoder.to(latents.device)
        return self._decoder.decode(latents)

    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime, final: bool) -> dict:
        """A class-conditional sample grid (CFG), and domain metrics of class-balanced samples if configured."""
        from usp.sample.guided import sample_images, save_grid

        if not runtime.is_main:
            return {}
        gen, seed = self.config.generation, self.config.run.seed
        model.eval()
        classes = min(gen.grid_classes, self.config.model.num_classes)
        # Grid: row = sample index within class, column = class; the same seeds at every step.
        indices = [r * classes + c for r in range(gen.grid_per_class) for c in range(classes)]
        images, _ = sample_images(model, self.decode, gen, indices, seed, classes, True, self.latent_shape,
                                  batch_size=self.config.train.eval_batch)
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=classes)
        if not (gen.eval_samples and gen.domain_classifier):
            return {}
        from usp.evaluate.domain import DomainEvaluator, domain_metrics

        if self._domain is None:  # the real side is fixed: its statistics are computed once
            import numpy as np

            self._domain = DomainEvaluator.load(gen.domain_classifier)
            with np.load(gen.domain_reference) as reference:
                self._real_stats = self._domain.statistics(reference["arr_0"])
        fake, labels = sample_images(model, self.decode, gen, list(range(gen.eval_samples)), seed + 10**7,
                                     self.config.model.num_classes, True, self.latent_shape,
                                     batch_size=self.config.train.eval_batch)
        return domain_metrics(self._domain, fake, labels, self._real_stats)

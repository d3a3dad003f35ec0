"""The tasks the one engine trains: each supplies a model, a dataset, per-sample randomness and the loss of
a batch (and optionally `evaluate` and `param_groups`). One file per task; `build_task` picks by `run.task`.

May import: config, data, latent, models, diffusion, evaluate, sample. Never the engine's callers (demo, cli).
"""

from __future__ import annotations

import torch

from usp.config import Config
from usp.train.tasks.classification import ClassifierTask
from usp.train.tasks.generation import GenerationTask
from usp.train.tasks.pretrain import PretrainTask
from usp.train.tasks.vae import VAETask

TASK_BUILDERS = {"pretrain": PretrainTask, "vae": VAETask, "finetune": GenerationTask, "probe": ClassifierTask,
                 "classify": ClassifierTask}


def check_inputs(config: Config) -> None:
    """Before step 1, not after the last: every split the run reads exists, is non-empty and (for a latent
    cache) was made from this recipe's VAE and images; model.num_classes fits the data."""
    from usp.data.images import build_image_dataset, check_num_classes
    from usp.latent.cache import verify_cache

    task, dc = config.run.task, config.data
    splits = [dc.split] + ([dc.eval_split] if task in ("vae", "probe", "classify") else [])
    if config.latent.cache and task != "vae":
        datasets = verify_cache(config, splits)
    else:
        datasets = [build_image_dataset(dc.source, dc.root, split, None, dc.limit, dc.download) for split in splits]
    for split, dataset in zip(splits, datasets):
        if len(dataset) == 0:
            raise ValueError(f"data split {split!r} is empty (data.limit={dc.limit}); check data.root and data.limit")
    if task in ("finetune", "probe", "classify"):
        check_num_classes(config.model.num_classes, datasets[0])


def build_task(config: Config):
    if config.run.task not in TASK_BUILDERS:
        raise ValueError(f"run.task={config.run.task!r} has no task yet; available: {', '.join(TASK_BUILDERS)}")
    check_inputs(config)
    torch.manual_seed(config.run.seed)  # the model's initialisation depends on the recipe's seed only
    return TASK_BUILDERS[config.run.task](config)

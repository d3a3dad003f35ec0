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


def build_task(config: Config):
    if config.run.task not in TASK_BUILDERS:
        raise ValueError(f"run.task={config.run.task!r} has no task yet; available: {', '.join(TASK_BUILDERS)}")
    torch.manual_seed(config.run.seed)  # the model's initialisation depends on the recipe's seed only
    return TASK_BUILDERS[config.run.task](config)

"""The tasks the one engine trains: each supplies a model, a dataset, per-sample randomness and the loss of
a batch (and optionally `evaluate` and `param_groups`). One file per task; `build_task` picks by `run.task`;
`train_command` is what the training commands (`usp pretrain`, ...) call.

May import: config, run, data, latent, models, diffusion, evaluate, sample. Never the engine's callers (demo, cli).
"""

from __future__ import annotations

import json

import torch

from usp.config import Config
from usp.train.tasks.classification import ClassifierTask
from usp.train.tasks.generation import GenerationTask
from usp.train.tasks.pretrain import PretrainTask
from usp.train.tasks.vae import VAETask

TASK_BUILDERS = {"pretrain": PretrainTask, "vae": VAETask, "finetune": GenerationTask, "probe": ClassifierTask,
                 "classify": ClassifierTask}


def check_inputs(config: Config) -> None:
    """Before step 1, not after the last: the evaluation split exists and is non-empty (it is read only at the
    end), and a latent cache is complete and made from this recipe's VAE and images. The training split is
    checked by the task that builds it."""
    from usp.data.images import build_image_dataset
    from usp.latent.cache import verify_cache

    task, dc = config.run.task, config.data
    splits = [dc.split] + ([dc.eval_split] if task in ("vae", "probe", "classify") else [])
    if config.latent.cache and task != "vae":
        datasets = verify_cache(config, splits)
    else:
        datasets = [build_image_dataset(dc.source, dc.root, split, None, dc.limit, dc.download)
                    for split in splits[1:]]
    if any(len(d) == 0 for d in datasets):
        raise ValueError(f"a data split the run reads ({', '.join(splits)}) is empty; check data.root and data.limit")


def build_task(config: Config):
    if config.run.task not in TASK_BUILDERS:
        raise ValueError(f"run.task={config.run.task!r} has no task yet; available: {', '.join(TASK_BUILDERS)}")
    check_inputs(config)
    # The model's initialisation depends on the recipe's seeds only (model.init_seed, else run.seed).
    torch.manual_seed(config.run.seed if config.model.init_seed is None else config.model.init_seed)
    task = TASK_BUILDERS[config.run.task](config)
    if config.run.task in ("finetune", "probe", "classify"):
        from usp.data.images import check_num_classes

        check_num_classes(config.model.num_classes, task.train_set)
    return task


def train_command(config: Config, resume: str = "auto", fast: bool = False) -> None:
    """`usp pretrain | train-vae | finetune | probe | classify RECIPE`: train the recipe's task in its run folder.
    resume: auto (the run folder's latest checkpoint), none (start fresh) or a state_*.pt path. `usp probe --fast`
    reads out frozen features instead (NOT the paper's probe) and prints the accuracies."""
    if fast:
        from usp.train.tasks.classification import fast_probe

        print(json.dumps(fast_probe(config), indent=1))
        return
    from usp.train.engine import setup_runtime, train

    runtime = setup_runtime(config.run.device)  # the process group and logging first: building the task logs
    train(config, build_task(config), runtime, resume=None if resume == "none" else resume)
    print(f"run folder: {config.run_dir}")

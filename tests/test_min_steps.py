"""The floor on steps (train.min_steps; the probe's default): a small dataset's few large steps become finer ones
with the same summed lr, and a schedule already long enough is left alone."""

from __future__ import annotations

import pytest
import torch

from usp.config import PROBE_MIN_STEPS, load_config
from usp.train.engine import BatchPlan as Plan
from usp.train.engine import Runtime
from usp.train.optim import lr_at

ONE = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


def test_a_short_schedule_is_stretched_at_the_same_summed_lr():
    # The paper's probe (batch 1 024, 10 epochs, 0.5 warm-up epochs) on 1 500 images: 1 step per epoch, 10 steps.
    config = load_config("fmnist/probe", ["train.global_batch=1024", "train.epochs=10", "optim.warmup_epochs=0.5"])
    plan = Plan.of(config.train, 0.5, 1500, ONE, min_steps=500)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (1, 500, 25)  # warm-up 0.5 × 50
    assert plan.lr_factor == pytest.approx(10 / 500)
    natural = Plan.of(config.train, 0.5, 1500, ONE)
    assert (natural.total_steps, natural.warmup_steps, natural.lr_factor) == (10, 0, 1.0)  # round(0.5) = 0

    def summed(p: Plan) -> float:
        return sum(lr_at(s, base_lr=0.4 * p.lr_factor, warmup_steps=p.warmup_steps, total_steps=p.total_steps,
                         min_lr=0.0, schedule="cosine") for s in range(p.total_steps))

    # Cosine over 10 coarse steps vs 500 fine ones: the same area up to the coarse grid's discretisation.
    assert summed(plan) == pytest.approx(summed(natural), rel=0.1)


def test_floor_defaults_and_long_schedules():
    assert load_config("probe/vit_b_2_sdvae_224").min_steps == PROBE_MIN_STEPS
    assert load_config("pretrain/vit_b_2_sdvae_224").min_steps == 0
    assert load_config("probe/vit_b_2_sdvae_224", ["train.min_steps=0"]).min_steps == 0
    imagenet = load_config("probe/vit_b_2_sdvae_224")  # 90 epochs of 1 281 167 images at 16 384: 7 020 steps
    plan = Plan.of(imagenet.train, imagenet.optim.warmup_epochs, 1_281_167, ONE, imagenet.min_steps)
    assert (plan.total_steps, plan.lr_factor) == (90 * 78, 1.0)
    explicit = load_config("fmnist/probe", ["train.max_steps=7", "train.global_batch=1024"])
    assert Plan.of(explicit.train, 0.5, 1500, ONE, 500).total_steps == 7  # max_steps is what the user asked for

"""Shared fixtures: a tiny VAE folder built from a config (no download), small real data, recipes."""

from __future__ import annotations

import os

# The CLI's thread-wait policy, set before torch starts its pools: spinning OpenMP waiters steal the cores
# the working threads need on a shared CPU (a measured test: 98 s without, 11 s with, on a loaded machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# `train.amp: auto` is bf16 on a CPU with native bf16 and fp32 elsewhere; the suite compares numerics at fp32
# tolerances, so it pins auto to fp32 for itself and every CLI subprocess it starts (they inherit the environment),
# whatever machine it runs on. tests/test_precision.py unsets it to exercise both branches;
# `USP_CPU_AMP=bf16 pytest ...` runs the suite the way auto runs on a native-bf16 CPU.
os.environ.setdefault("USP_CPU_AMP", "fp32")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from usp.latent.vae import F4_AUTOENCODER_CONFIG, STATS_FILE  # noqa: E402

TINY_VAE_CONFIG = {**F4_AUTOENCODER_CONFIG, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A randomly initialised f4 AutoencoderKL saved as a diffusers folder, with its latent stats."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "small-f4"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(str(folder))
    (folder / STATS_FILE).write_text(json.dumps({"scale": 2.0, "shift": 0.1}))
    return folder


@pytest.fixture
def fmnist_overrides(tiny_vae_dir, tmp_path) -> list[str]:
    """Overrides that turn the defaults into a tiny Fashion-MNIST pretraining recipe."""
    return [
        "data.source=fashion_mnist", "data.image_size=32", "data.limit=64", "data.num_workers=0",
        "latent.space=small-f4", f"latent.path={tiny_vae_dir}", "model.name=vit_t_2",
        f"run.out_dir={tmp_path / 'runs'}", "run.name=test", "train.global_batch=16", "train.max_steps=4",
        "train.log_every=1", "train.ckpt_every=2", "train.tensorboard=false", "train.progress=false",
        "optim.warmup_epochs=0.5",
    ]


def interrupt_at_loss_call(task, n: int) -> None:
    """Make `task.loss` raise KeyboardInterrupt on its n-th call: a run killed inside a step, for resume tests."""
    original, calls = task.loss, {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(model, batch)

    task.loss = loss


@pytest.fixture
def interrupt_loss():
    """`interrupt_loss(task, n)`: task.loss raises KeyboardInterrupt on its n-th call."""
    return interrupt_at_loss_call

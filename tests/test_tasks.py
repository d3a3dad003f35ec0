"""Every task end to end on tiny recipes: pretrain → DiT/SiT fine-tune → sample; probe; classify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from usp.config import load_config
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_vae_dir):
    """A 2-step USP pretraining run on the tiny VAE; returns (weights path, common overrides)."""
    root = tmp_path_factory.mktemp("tasks")
    common = ["data.source=fashion_mnist", "data.image_size=32", "data.limit=32", "data.num_workers=0",
              "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"run.out_dir={root}",
              "train.global_batch=8", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
              "train.tensorboard=false", "train.progress=false", "optim.warmup_epochs=0"]
    config = load_config(None, [*common, "model.name=vit_t_2", "run.name=pre"])
    train(config, build_task(config), CPU, resume=None)
    return ckpt.latest_weights(config.run_dir / "checkpoints"), common


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_finetune_from_usp_transfers_trains_and_samples(pretrained, family):
    weights, common = pretrained
    dit = ["generation.method=ddpm", "generation.sampler=ddim", "generation.sample_steps=ddim3"]
    sit = ["generation.method=transport", "generation.sampler=ode", "generation.ode_method=euler",
           "generation.sample_steps=3"]
    method = dit if family == "dit" else sit
    config = load_config(None, [*common, *method, "run.task=finetune", f"model.name={family}_t_2",
                                f"model.init={weights}",
                                "model.affine_norms=true", "model.num_classes=10", "run.name=" + family,
                                "train.ema_decay=0.9", "optim.lr=1e-3", "optim.weight_decay=0.0",
                                "generation.grid_per_class=1"])
    task = build_task(config)
    source, _ = load_weights(weights)
    # Transfer: every encoder block is copied, the DiT-only parts are new.
    block = task.model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "blocks.1.norm1.weight"):
        assert torch.equal(block[key], source[key])
    report = json.loads((config.run_dir / "transfer.json").read_text())
    assert not any(k.startswith("decoder") for k in report["loaded"])
    result = train(config, task, CPU, resume=None)
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    grid = config.run_dir / "samples" / "step_0000002.png"
    assert grid.is_file() and grid.stat().st_size > 100
    # The EMA weights are what the weights file holds.
    saved, meta = load_weights(ckpt.latest_weights(config.run_dir / "checkpoints"))
    assert meta["ema"] and torch.equal(saved["blocks.0.attn.qkv.weight"], result["ema"].blocks[0].attn.qkv.weight)


def test_usp_sample_writes_adm_npz_independent_of_batch_size(pretrained, tmp_path):
    from usp.sample.run import run_sampling

    weights, common = pretrained
    config = load_config(None, [*common, "run.task=finetune", "model.name=dit_t_2", "model.num_classes=10",
                                "run.name=gen",
                                "generation.sampler=ddpm", "generation.sample_steps=4"])
    train(config, build_task(config), CPU, resume=None)
    generator = ckpt.latest_weights(config.run_dir / "checkpoints")
    a = run_sampling(generator, ["generation.cfg_scale=1.5"], out_dir=tmp_path / "a", num_samples=5, batch_size=5)
    b = run_sampling(generator, ["generation.cfg_scale=1.5"], out_dir=tmp_path / "b", num_samples=5, batch_size=2)
    images_a, images_b = np.load(a), np.load(b)
    assert images_a["arr_0"].shape == (5, 32, 32, 3) and images_a["arr_0"].dtype == np.uint8
    assert np.array_equal(images_a["arr_1"], images_b["arr_1"])
    # DDPM draws fresh noise each step: per-sample seeds make it independent of the batch size.
    assert np.abs(images_a["arr_0"].astype(int) - images_b["arr_0"].astype(int)).max() <= 1
    assert (tmp_path / "a" / "grid.png").is_file()
    # Resumption: a finished chunk is not recomputed.
    chunk = tmp_path / "a" / "chunk_00000.npz"
    stamp = chunk.stat().st_mtime_ns
    run_sampling(generator, ["generation.cfg_scale=1.5"], out_dir=tmp_path / "a", num_samples=5, batch_size=5)
    assert chunk.stat().st_mtime_ns == stamp


def test_linear_probe_freezes_the_encoder_and_evaluates(pretrained):
    weights, common = pretrained
    config = load_config(None, [*common, "run.task=probe", "model.name=vit_t_2", f"model.init={weights}",
                                "model.global_pool=false", "model.num_classes=10", "run.name=probe", "optim.name=lars",
                                "optim.lr=0.5", "optim.weight_decay=0.0", "data.eval_split=test"])
    task = build_task(config)
    before = {k: v.clone() for k, v in task.model.state_dict().items() if not k.startswith("head")}
    train(config, task, CPU, resume=None)
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()][-1]
    assert 0.0 <= record["eval"]["top1"] <= record["eval"]["top5"] <= 100.0


def test_classify_with_layer_decay_and_mixup_runs(pretrained):
    weights, common = pretrained
    config = load_config(None, [*common, "run.task=classify", "model.name=vit_t_2", f"model.init={weights}",
                                "model.num_classes=10", "model.drop_path=0.1", "run.name=cls",
                                "classify.mixup=0.8", "classify.cutmix=1.0", "classify.label_smoothing=0.1",
                                "classify.randaug=rand-m9-mstd0.5-inc1", "classify.random_erasing=0.25",
                                "optim.layer_decay=0.75", "optim.blr=1e-3", "data.eval_split=test"])
    task = build_task(config)
    scales = sorted({round(g["lr_scale"], 6) for g in task.param_groups()})
    assert scales == sorted({round(0.75 ** (5 - layer), 6) for layer in range(6)})
    result = train(config, task, CPU, resume=None)
    assert all(np.isfinite(r["loss"]) for r in result["history"])


def test_init_seed_changes_only_the_initial_weights(pretrained):
    """model.init_seed draws the initial weights from its own seed (None: run.seed); the data order and the
    per-sample noise stay those of run.seed, so a run differing only in init_seed is the demo's paired control."""
    _, common = pretrained
    base = [*common, "run.task=finetune", "model.name=sit_t_2", "model.num_classes=10",
            "generation.method=transport", "generation.sampler=ode", "run.seed=3"]
    default, same, other = (build_task(load_config(None, [*base, *extra]))
                            for extra in ([], ["model.init_seed=3"], ["model.init_seed=4"]))
    weights = [dict(t.model.state_dict()) for t in (default, same, other)]
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(weights[0][key], weights[1][key]) and not torch.equal(weights[0][key], weights[2][key])

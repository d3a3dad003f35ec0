"""The LightningDiT path a user runs, on the shipped Fashion-MNIST recipes at a tiny size: USP pretraining of the
LightningDiT-shaped encoder -> LightningDiT fine-tune from it (logit-normal t, cosine loss) -> `usp sample`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from usp.config import load_config
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))
FMNIST = Path(__file__).parents[1] / "configs" / "fmnist"


def test_pretrain_transfer_finetune_and_sample_lightningdit(tiny_vae_dir, tmp_path):
    tiny = ["data.limit=32", "data.num_workers=0", f"latent.path={tiny_vae_dir}", "latent.cache=null",
            f"run.out_dir={tmp_path}", "train.global_batch=8", "train.max_steps=2", "train.log_every=1",
            "train.ckpt_every=2", "train.tensorboard=false", "train.progress=false", "train.eval_every=0"]
    pre = load_config(FMNIST / "pretrain_lightning.yaml", tiny)
    train(pre, build_task(pre), CPU, resume=None)
    weights = ckpt.latest_weights(pre.run_dir / "checkpoints")
    source, _ = load_weights(weights)
    assert "blocks.0.mlp.w12.weight" in source and "rope.freqs_cos" in source

    config = load_config(FMNIST / "lightningdit_usp.yaml", [*tiny, f"model.init={weights}",
                                                            "generation.grid_per_class=1", "generation.eval_samples=0"])
    task = build_task(config)
    state = task.model.state_dict()
    for key in ("blocks.1.mlp.w12.weight", "blocks.3.norm2.weight", "blocks.0.attn.qkv.bias"):
        assert torch.equal(state[key], source[key])
    report = json.loads((config.run_dir / "transfer.json").read_text())
    assert "blocks.0.mlp.w3.weight" in report["loaded"] and "feat_rope.freqs_cos" in report["newly_initialised"]
    result = train(config, task, CPU, resume=None)
    for record in result["history"]:  # LightningDiT's loss: MSE + cosine, both logged
        assert math.isfinite(record["loss"]) and 0 <= record["cos_loss"] <= 2
        assert abs(record["loss"] - record["mse"] - record["cos_loss"]) < 1e-5

    from usp.sample.run import run_sampling

    generator = ckpt.latest_weights(config.run_dir / "checkpoints")
    npz = run_sampling(generator, ["generation.preset=lightningdit", "generation.sample_steps=3",
                                   "generation.guided_channels=3"], out_dir=tmp_path / "samples", num_samples=4,
                       batch_size=4)
    images = np.load(npz)["arr_0"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8


def test_an_official_lightningdit_checkpoint_loads_for_sampling(tmp_path):
    """LightningDiT's train.py saves {model, ema, opt, config}; `usp sample CKPT --model lightningdit_*` reads the EMA
    strictly, without learned sigma, and samples with its preset."""
    from usp.models import create_model
    from usp.sample.guided import sample_latents
    from usp.sample.run import load_generator

    torch.manual_seed(0)
    official = create_model("lightningdit_t_1", input_size=2, in_channels=8, num_classes=10)
    ema = {k: v + 0.01 for k, v in official.state_dict().items()}
    opt = torch.optim.AdamW(official.parameters(), lr=2e-4).state_dict()
    torch.save({"model": official.state_dict(), "ema": ema, "opt": opt,
                "config": {"model": {"model_type": "LightningDiT-T/1", "use_swiglu": True}}}, tmp_path / "0080000.pt")
    model, config = load_generator(tmp_path / "0080000.pt", ["latent.space=small-f4", "data.image_size=8",
                                                             "model.num_classes=10", "generation.preset=lightningdit",
                                                             "generation.sample_steps=3"],
                                   model_name="lightningdit_t_1")
    assert torch.equal(model.state_dict()["blocks.0.mlp.w12.weight"], ema["blocks.0.mlp.w12.weight"])
    assert config.generation.timestep_shift == 0.3 and not config.generation.learn_sigma
    z = sample_latents(model, config.generation, torch.tensor([1, 2]), [0, 1], (8, 2, 2))
    assert z.shape == (2, 8, 2, 2) and torch.isfinite(z).all()

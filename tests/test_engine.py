"""The engine through the pretraining task: loss falls, exact resume, DDP equivalence, bad inputs."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from usp.config import load_config
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


def run(overrides, resume="auto"):
    config = load_config(None, overrides)
    return config, train(config, build_task(config), CPU, resume=resume)


def final_weights(config) -> dict:
    state = ckpt.load_state(ckpt.latest_state(config.run_dir / "checkpoints"))
    return state["model"]


def test_pretraining_writes_config_log_and_checkpoints(fmnist_overrides):
    config, result = run(fmnist_overrides)
    run_dir = config.run_dir
    assert load_config(run_dir / "config.yaml").to_dict() == config.to_dict()  # the resolved recipe round-trips
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["images_seen"] == 4 * 16
    # keep_last=2 by default: steps 2 and 4 remain, of both kinds.
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["state_0000002.pt", "state_0000004.pt", "weights_0000002.safetensors",
                     "weights_0000004.safetensors"]
    weights, meta = load_weights(run_dir / "checkpoints" / "weights_0000004.safetensors")
    assert meta["task"] == "pretrain" and meta["step"] == 4
    assert all(torch.equal(weights[k], v) for k, v in result["model"].state_dict().items())


def test_resume_is_bit_exact(fmnist_overrides, interrupt_loss):
    config_a, _ = run([*fmnist_overrides, "run.name=straight", "train.max_steps=6"])
    # The same 6-step run, interrupted during step 3 (after the step-2 checkpoint), then the same
    # command again with --resume auto.
    config_b = load_config(None, [*fmnist_overrides, "run.name=split", "train.max_steps=6"])
    interrupted = build_task(config_b)
    interrupt_loss(interrupted, 3)
    with pytest.raises(KeyboardInterrupt):
        train(config_b, interrupted, CPU, resume="auto")
    assert ckpt.latest_state(config_b.run_dir / "checkpoints").name == "state_0000002.pt"
    train(config_b, build_task(config_b), CPU, resume="auto")
    a, b = final_weights(config_a), final_weights(config_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = load_config(None, overrides)
    train(config, build_task(config), Runtime(rank, world, torch.device("cpu")), resume=None)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(fmnist_overrides):
    # SGD, so the weights differ by lr × (gradient difference); Adam would amplify float-rounding noise
    # of near-zero gradients to a full lr-sized step and hide what this test measures.
    sgd = ["optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0.0", "train.max_steps=3"]
    single = [*fmnist_overrides, *sgd, "run.name=single"]
    config_1, _ = run(single, resume=None)
    double = [*fmnist_overrides, *sgd, "run.name=ddp"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    a, b = final_weights(config_1), final_weights(load_config(None, double))
    moved = max((a[k].float() - ckpt.load_state(config_1.run_dir / "checkpoints" / "state_0000002.pt")["model"][k]
                 ).abs().max().item() for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert moved > 1e-3  # the third step really changed the weights
    assert worst < 1e-6, worst


def test_loss_falls_on_fashion_mnist(fmnist_overrides):
    config, result = run([*fmnist_overrides, "data.limit=256", "train.max_steps=40", "train.log_every=10",
                          "optim.lr=2e-3", "optim.warmup_epochs=0.2"])
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fmnist_overrides):
    # max_skipped_steps=1: the first step with non-finite gradients stops the run (more in tests/test_faults.py).
    config = load_config(None, [*fmnist_overrides, "train.max_steps=6", "train.max_skipped_steps=1"])
    task = build_task(config)
    calls = {"n": 0}
    original = task.loss

    def poisoned(model, batch):
        calls["n"] += 1
        out = original(model, batch)
        return {"loss": out["loss"] * float("nan")} if calls["n"] == 3 else out

    task.loss = poisoned
    from usp.train.engine import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="steps \\(3-3\\) had non-finite gradients.*newest checkpoint is .*"
                                            "state_0000002.pt"):
        train(config, task, CPU, resume=None)
    assert ckpt.latest_state(config.run_dir / "checkpoints").name == "state_0000002.pt"
    good = ckpt.load_state(config.run_dir / "checkpoints" / "state_0000002.pt")["model"]
    assert all(torch.isfinite(v).all() for v in good.values())


def test_fresh_run_refuses_to_overwrite(fmnist_overrides):
    config, _ = run(fmnist_overrides)
    with pytest.raises(FileExistsError, match="--resume auto"):
        train(config, build_task(config), CPU, resume=None)


def test_checkpoint_of_another_model_is_a_clear_error(fmnist_overrides):
    config, _ = run(fmnist_overrides)
    other = load_config(None, [*fmnist_overrides, "model.name=vit_s_1", "train.max_steps=6"])
    with pytest.raises(ValueError, match="does not match the model"):
        train(other, build_task(other), CPU, resume="auto")

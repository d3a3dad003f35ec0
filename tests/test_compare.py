"""`usp compare-run`: two seeds of one recipe stay inside each other's band; a different lr is caught."""

from __future__ import annotations

import json

import pytest
import torch

from usp.cli import main
from usp.config import load_config
from usp.evaluate.compare import Run, compare, format_comparison, load_runs
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


def _train(overrides: list[str], name: str, *extra: str):
    config = load_config(None, [*overrides, f"run.name={name}", "data.limit=256", "train.max_steps=40",
                                "train.log_every=4", "train.ckpt_every=40", "optim.blr=1.5e-3",
                                "optim.schedule=constant", *extra])
    train(config, build_task(config), CPU, resume=None)
    return config.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_vae_dir):
    out = tmp_path_factory.mktemp("compare")
    overrides = [
        "data.source=fashion_mnist", "data.image_size=32", "data.num_workers=0", "latent.space=small-f4",
        f"latent.path={tiny_vae_dir}", "model.name=vit_t_2", f"run.out_dir={out}", "train.global_batch=32",
        "train.tensorboard=false", "train.progress=false", "optim.warmup_epochs=0.5",
    ]
    return {"seed0": _train(overrides, "seed0", "run.seed=0"), "seed1": _train(overrides, "seed1", "run.seed=1"),
            "low_lr": _train(overrides, "low_lr", "run.seed=0", "optim.blr=5e-5")}


def test_two_seeds_of_one_recipe_do_not_diverge(runs, capsys):
    result = compare(load_runs(runs["seed1"])[0], load_runs(runs["seed0"]), loss_tol=0.1)
    table = format_comparison(result, "seed1", ["seed0"], 0.1, 0.1, 2)
    assert len(result.rows) == 10 and not result.diverged and result.lr_differs_at is None, table
    # The CLI prints the table and exits 0 within the band.
    main(["compare-run", str(runs["seed1"]), str(runs["seed0"]), "--loss-tol", "0.1"])
    assert "within the reference's band at all 10 matching steps" in capsys.readouterr().out


def test_a_different_learning_rate_is_reported_with_the_step_it_leaves_the_band(runs, capsys):
    result = compare(load_runs(runs["low_lr"])[0], load_runs(runs["seed0"]), loss_tol=0.1)
    assert result.lr_differs_at == 4  # the first logged step (warm-up: lr differs from the start)
    assert result.loss_leaves_at is not None and result.diverged
    # Leaving = the first of `patience` consecutive out-of-band steps, and every step before it was inside.
    outside = [r["step"] for r in result.rows if r["out"]]
    assert result.loss_leaves_at in outside
    index = [r["step"] for r in result.rows].index(result.loss_leaves_at)
    assert result.rows[index + 1]["out"]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare-run", str(runs["low_lr"]), str(runs["seed0"]), "--loss-tol", "0.1"])
    assert exit_info.value.code == 1
    text = capsys.readouterr().out
    assert f"loss leaves the reference's band at step {result.loss_leaves_at}" in text
    assert "learning rate differs from step 4" in text


def test_a_folder_of_seeds_is_one_reference_whose_envelope_is_the_band(runs):
    folder = runs["seed0"].parent
    references = [r for r in load_runs(folder) if r.name != "low_lr"]
    assert {r.name for r in load_runs(folder)} == {"seed0", "seed1", "low_lr"}
    result = compare(load_runs(runs["seed0"])[0], references, loss_tol=0.0)
    assert not result.diverged  # a run is always inside an envelope that includes itself


def test_fd_band_uses_the_bootstrap_error_and_patience(tmp_path):
    def run(fds, se):
        train = [{"step": s, "loss": 1.0, "lr": 1e-3} for s in (100, 200, 300)]
        evals = [{"step": s, "domain_fd": fd, "domain_fd_se": se} for s, fd in zip((100, 200, 300), fds)]
        return Run("x", train, evals)

    reference = run([100.0, 80.0, 60.0], 2.0)
    # 10 % + 2 * sqrt(2^2 + 2^2) = 5.66 of slack at step 300: 60 * 1.1 + 5.66 = 71.7.
    assert compare(run([100.0, 80.0, 71.0], 2.0), [reference]).fd_leaves_at is None
    assert compare(run([100.0, 80.0, 72.5], 2.0), [reference]).fd_leaves_at == 300
    with pytest.raises(FileNotFoundError, match="no log.jsonl"):
        load_runs(tmp_path)
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1.0}) + "\n")
    assert load_runs(tmp_path)[0].train[0]["loss"] == 1.0

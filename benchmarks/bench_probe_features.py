"""The paper's linear probe on a latent cache: features computed once vs the encoder every step.

Runs the shipped Fashion-MNIST probe recipe (LARS, BN + linear head, flip only) both ways on the same cache and
encoder, same seed (so the same flip draws), and prints top-1 / top-5 and the wall time of each.

  python benchmarks/bench_probe_features.py DEMO_OUT [overrides...]
    DEMO_OUT: a `usp demo --quick --out DEMO_OUT` folder (its VAE, latent cache and pretraining run)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it (usp.cli.main), before torch starts
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from usp.config import load_config  # noqa: E402
from usp.run import checkpoint as ckpt  # noqa: E402
from usp.train.engine import setup_runtime, train  # noqa: E402
from usp.train.tasks import build_task  # noqa: E402


def run(overrides: list[str], per_step: bool) -> dict:
    import usp.train.tasks.classification as classification

    original = classification.probe_on_features
    if per_step:
        classification.probe_on_features = lambda config, data: False
    try:
        config = load_config("fmnist/probe", overrides + [f"run.name=probe-{'per-step' if per_step else 'features'}"])
        shutil.rmtree(config.run_dir, ignore_errors=True)  # each measurement starts fresh
        start = time.perf_counter()
        task = build_task(config)  # with features: their extraction (2 orientations of the training split)
        built = time.perf_counter()
        train(config, task, setup_runtime("cpu"), resume=None)  # the steps, the evaluation, the loss curve
        seconds, setup = time.perf_counter() - start, built - start
    finally:
        classification.probe_on_features = original
    result = json.loads((config.run_dir / "result.json").read_text())
    return {"top1": result["top1"], "top5": result["top5"], "seconds": round(seconds, 1),
            "setup_seconds": round(setup, 1), "train_seconds": round(seconds - setup, 1),
            "ms_per_step": round(1000 * (seconds - setup) / result["step"], 1), "steps": result["step"],
            "on_features": task.on_features}


def main() -> None:
    demo = Path(sys.argv[1])
    weights = ckpt.latest_weights(demo / "runs" / "fmnist-pretrain" / "checkpoints")
    overrides = [f"latent.path={demo / 'vae'}", f"latent.cache={demo / 'latents'}", f"model.init={weights}",
                 f"run.out_dir={demo / 'bench_probe'}", "train.progress=false", "train.tensorboard=false",
                 "run.device=cpu", *sys.argv[2:]]
    features = run(overrides, per_step=False)
    per_step = run(overrides, per_step=True)
    print(json.dumps({"features_once": features, "encoder_every_step": per_step,
                      "speed-up": round(per_step["seconds"] / features["seconds"], 1),
                      "speed-up of the training loop": round(per_step["train_seconds"] / features["train_seconds"],
                                                             1)}, indent=1))


if __name__ == "__main__":
    main()

"""The paper's linear probe on a latent cache: features computed once vs the encoder every step.

Runs the shipped Fashion-MNIST probe recipe (LARS, BN + linear head, flip only) both ways on the same cache and
encoder, same seed (so the same flip draws), alternating, twice each, after importing what only a process's first
run would pay for; prints top-1 / top-5 and the wall time of each: set-up (for the features: their extraction)
and the training loop (steps, the end-of-run evaluation, the loss curve).

  python benchmarks/bench_probe_features.py DEMO_OUT [overrides...]
    DEMO_OUT: a `usp demo --quick --out DEMO_OUT` folder (its VAE and pretraining run; the cache is made here)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it (usp.cli.main), before torch starts
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from usp.config import load_config  # noqa: E402
from usp.run import checkpoint as ckpt  # noqa: E402
from usp.train.engine import setup_runtime, train  # noqa: E402
from usp.train.tasks import build_task  # noqa: E402

PAIRS = 2


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
    # Its own cache of the demo's training subset and as many test images (the demo's test cache holds fewer, and a
    # cache is checked against the recipe's data.limit), encoded by the demo's VAE; made once.
    images = json.loads((demo / "stages" / "cache.json").read_text())["train"]
    cache, limit = demo / "bench_probe_latents", [f"data.limit={images}", f"latent.path={demo / 'vae'}"]
    if not (cache / "test.latents").exists():
        subprocess.run([sys.executable, "-m", "usp", "cache-latents", "fmnist/probe", "--out", str(cache),
                        "--splits", "train", "test", *limit], check=True)
    overrides = [*limit, f"latent.cache={cache}", f"model.init={weights}",
                 f"run.out_dir={demo / 'bench_probe'}", "train.progress=false", "train.tensorboard=false",
                 "run.device=cpu", *sys.argv[2:]]
    warm_imports(load_config("fmnist/probe", overrides))
    runs = {"features_once": [], "encoder_every_step": []}
    for _ in range(PAIRS):  # alternating, so a drift of the machine's speed shows in both
        runs["features_once"].append(run(overrides, per_step=False))
        runs["encoder_every_step"].append(run(overrides, per_step=True))
    medians = {mode: {key: statistics.median(r[key] for r in results) for key in ("seconds", "setup_seconds",
                                                                                 "train_seconds", "ms_per_step")}
               for mode, results in runs.items()}
    features, per_step = medians.values()
    # The same loop with a larger encoder: a step of the per-step probe costs the features loop's step plus the
    # encoder's forward of the batch; the features probe pays 2 forwards per image once (epochs / 2 fewer).
    config = load_config("fmnist/probe", overrides)
    epochs, batch = config.train.epochs, config.train.global_batch
    vit_b = encoder_seconds_per_image("probe/vit_b_2_sdvae_224", 28, 4)
    head = features["ms_per_step"] / 1000 / batch  # per image: data, BN + linear, LARS, the engine
    print(json.dumps({"runs": runs, "medians": medians,
                      "speed-up": round(per_step["seconds"] / features["seconds"], 1),
                      "speed-up of the training loop": round(per_step["train_seconds"] / features["train_seconds"],
                                                             1),
                      "vit_b_2_224px_encoder_s_per_image": round(vit_b, 4),
                      f"predicted speed-up at {epochs:g} epochs with that encoder":
                          round((head + vit_b) / (head + 2 * vit_b / epochs), 1)}, indent=1))


def encoder_seconds_per_image(recipe: str, side: int, channels: int, batch: int = 8) -> float:
    """The frozen encoder's forward (features) per image on this machine, fp32, random weights (median of 3)."""
    import torch

    from usp.train.tasks.classification import build_classifier

    model = build_classifier(load_config(recipe, ["model.init=null", "run.device=cpu"]), side, channels).eval()
    x = torch.randn(batch, channels, side, side)
    times = []
    with torch.no_grad():
        for _ in range(4):
            start = time.perf_counter()
            model.forward_features(x)
            times.append((time.perf_counter() - start) / batch)
    return statistics.median(times[1:])


def warm_imports(config) -> None:
    """What the first run of a process would pay alone: the plotting library (the loss curve). The cache check
    hashes the VAE's weights file; it no longer loads the VAE, nor imports its library."""
    import matplotlib.pyplot  # noqa: F401


if __name__ == "__main__":
    main()

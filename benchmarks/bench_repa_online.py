"""REPA with its teacher online: the step time on cached latents against on-the-fly VAE encoding.

Both runs are the shipped `finetune/sit_b_2_usp_repa_256` recipe as a user runs it (`python -m usp finetune`, one
process per run) with `repa.features=online`: the teacher encodes each step's images. They differ only in where the
latents come from — A: `latent.cache` (the cached latent of each item, its image read beside it for the teacher);
B: no cache (the VAE encodes each step's images). The runs alternate A B A B ... so a drift of the machine's speed
shows in both; each run's per-step seconds are read from its log.jsonl (steps_per_s, logged every step; the first
step, which includes warm-up, is left out) and the medians are printed.

  python scripts/rehearse.py --out R --only probe/vit_b_2_sdvae_224 --no-sample   # the tree and weights files
  python benchmarks/bench_repa_online.py R [--batch 4] [--steps 4] [--pairs 2] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "finetune/sit_b_2_usp_repa_256"


def usp(argv: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "usp", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"`usp {' '.join(argv[:2])}` failed with exit {done.returncode}; see {log}")


def step_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [1 / r["steps_per_s"] for r in rows if "steps_per_s" in r and r["step"] > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rehearsal", type=Path, help="a scripts/rehearse.py --out folder (data/, assets/)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out, assets = args.rehearsal / "bench_repa", args.rehearsal / "assets"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    common = [f"data.root={args.rehearsal / 'data'}", f"data.limit={args.batch}", "data.num_workers=0",
              f"latent.path={assets / 'sd-vae-ft-ema'}", f"run.out_dir={out / 'runs'}", "run.device=cpu",
              f"repa.teacher_weights={assets / 'dinov2_vitb14.safetensors'}", "repa.features=online",
              f"train.max_steps={args.steps}", f"train.global_batch={args.batch}", "train.accum_steps=1",
              "train.log_every=1", f"train.ckpt_every={args.steps}", "train.eval_every=0", "train.tensorboard=false",
              "train.progress=false", "model.init=null", "generation.preset=none", "generation.grid_classes=1",
              "generation.grid_per_class=1", "generation.sampler=ode", "generation.ode_method=euler",
              "generation.sample_steps=2", "generation.eval_samples=0", "generation.domain_classifier=null",
              *args.overrides]
    cache = out / "latents"
    if not (cache / "train.latents").exists():
        usp(["cache-latents", RECIPE, "--out", str(cache), "--splits", "train", *common], out / "logs" / "cache.log")
    arms = {"cached": f"latent.cache={cache}", "on_the_fly": "latent.cache=null"}  # A, B
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for pair in range(args.pairs):
        for arm, source in arms.items():
            name = f"{arm}-{pair}"
            shutil.rmtree(out / "runs" / name, ignore_errors=True)
            usp(["finetune", RECIPE, "--resume", "none", *common, source, f"run.name={name}"],
                out / "logs" / f"{name}.log")
            seconds[arm] += step_seconds(out / "runs" / name)
            print(f"{name}: {[round(s, 2) for s in step_seconds(out / 'runs' / name)]} s per step", flush=True)
    medians = {arm: statistics.median(values) for arm, values in seconds.items()}
    a, b = medians.values()
    print(json.dumps({"batch": args.batch, "steps_timed_per_arm": {k: len(v) for k, v in seconds.items()},
                      "median_step_seconds": {k: round(v, 2) for k, v in medians.items()},
                      "on_the_fly / cached": round(b / a, 2)}, indent=1))


if __name__ == "__main__":
    main()

"""bf16 autocast vs fp32 on this CPU, interleaved: the training step (forward + backward + AdamW) of the demo's
pretraining (tiny ViT, batch 256) and of SiT-T/2 / DiT-T/2 fine-tuning (batch 128), built from the Fashion-MNIST
recipes through the real task code, one fp32 step and one bf16 step in turn so a drifting machine load hits both.

  python benchmarks/bench_amp_cpu.py --cache curve_out/latents --vae curve_out/vae [--pairs 15] [--threads 1]

Prints per step kind the median seconds of each precision and the median of the per-pair ratios bf16/fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from usp.config import load_config, recipes_dir
from usp.data.sampler import SeededDataset
from usp.run.runtime import cpu_has_native_bf16
from usp.train.optim import build_optimizer, param_groups
from usp.train.tasks import build_task


def step_fn(recipe: str, batch_size: int, args):
    config = load_config(recipes_dir() / "fmnist" / f"{recipe}.yaml",
                         [f"latent.path={args.vae}", f"latent.cache={args.cache}", "data.num_workers=0",
                          "data.limit=20000",
                          f"train.global_batch={batch_size}", "model.init=null", f"run.out_dir={tempfile.mkdtemp()}"])
    task = build_task(config)
    model = task.model
    data = SeededDataset(task.train_set, getattr(task, "extras", None))  # the engine's per-sample randomness
    batch = torch.utils.data.default_collate([data[(i, i)] for i in range(batch_size)])
    optimizer = build_optimizer("adamw", param_groups(model, 0.0), lr=1e-4)

    def step(dtype):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss(model, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"native bf16: {cpu_has_native_bf16()}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for label, recipe, batch in (("pretrain vit_t_2 b256", "pretrain", 256), ("SiT-T/2 b128", "sit_scratch", 128),
                                 ("DiT-T/2 b128", "dit_scratch", 128)):
        step = step_fn(recipe, batch, args)
        for dtype in (None, torch.bfloat16, None, torch.bfloat16):  # warm-up both paths
            step(dtype)
        times = {None: [], torch.bfloat16: []}
        ratios = []
        for k in range(args.pairs):
            pair = {}
            for dtype in ((None, torch.bfloat16) if k % 2 == 0 else (torch.bfloat16, None)):
                start = time.perf_counter()
                step(dtype)
                pair[dtype] = time.perf_counter() - start
                times[dtype].append(pair[dtype])
            ratios.append(pair[torch.bfloat16] / pair[None])
        print(f"{label}: fp32 {statistics.median(times[None]):.3f} s/step, bf16 "
              f"{statistics.median(times[torch.bfloat16]):.3f} s/step, bf16/fp32 median of {args.pairs} pair ratios "
              f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); load "
              f"{os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

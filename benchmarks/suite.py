"""`python benchmarks/run.py`: how fast usp trains, samples, reads latents and scores samples, against the official
code where a checkout is given (--official-usp/-dit/-sit) and against labelled baselines elsewhere.

One module per subject: bench_training.py (pretraining and generator training steps), bench_sampling.py (guided
samplers), bench_data.py (latent cache and VAE encode, fp32 and bf16), bench_scores.py (evaluation metrics),
bench_switches.py (fast paths off/on); bench_common.py holds the interleaved timer, memory and peak probes and the
table format; official.py imports the official code from a checkout; baselines.py holds the hand-made baselines.

Rows that are compared are timed interleaved (a, b, a, b, …) after their warm-up, so load drift on a shared machine
hits both alike; ratios are reported as the median and range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from bench_common import FULL, GPU_FULL, GPU_PAPER, GPU_QUICK, QUICK, Context, cpu_model, fmt, peak_for
from bench_data import bench_data, bench_vae
from bench_sampling import bench_sampling
from bench_scores import bench_metrics
from bench_switches import bench_switches
from bench_training import bench_finetune, bench_pretrain

WORKLOADS: dict[str, Callable[[Context], str]] = {
    "pretrain": bench_pretrain,
    "finetune": bench_finetune,
    "sampling": bench_sampling,
    "data": bench_data,
    "vae": bench_vae,
    "metrics": bench_metrics,
    "switches": bench_switches,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time usp's training steps, samplers, data path and metrics against baselines; prints one "
                    "markdown table per workload.",
        epilog="examples:\n  python benchmarks/run.py --quick                      # the CPU suite (a few minutes)\n"
               "  python benchmarks/run.py --quick --only metrics --out metrics.md\n"
               "  python benchmarks/run.py --quick --only pretrain --only finetune --only sampling \\\n"
               "      --official-usp ../USP --official-dit ../DiT --official-sit ../SiT   # usp ÷ official\n"
               "  python benchmarks/run.py --device cuda --paper-sizes   # ViT-XL/2, DiT-XL/2, SiT-XL/2, bf16, MFU",
    )
    parser.add_argument("--quick", action="store_true", help="small batches and few iterations (CPU: minutes)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    parser.add_argument("--only", action="append", choices=list(WORKLOADS), metavar="NAME",
                        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--paper-sizes", action="store_true",
                        help="GPU only: ViT-XL/2 pretraining, DiT-XL/2 and SiT-XL/2 fine-tuning at the largest batch "
                             "that fits, bf16 autocast, MFU against the measured bf16 matmul peak")
    parser.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16"),
                        help="training/sampling precision; auto = usp's default (bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (slow to compile on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: every core)")
    parser.add_argument("--official-usp", type=Path, metavar="PATH",
                        help="a clone of AMAP-ML/USP: time its pretraining MAE against usp's (same weights)")
    parser.add_argument("--official-dit", type=Path, metavar="PATH",
                        help="a clone of facebookresearch/DiT: time its training step and DDPM sampler")
    parser.add_argument("--official-sit", type=Path, metavar="PATH",
                        help="a clone of willisma/SiT: time its training step and SDE/ODE samplers")
    parser.add_argument("--metric-samples", type=int, help="override the number of feature vectors of the metrics")
    parser.add_argument("--metric-dim", type=int, help="override the feature dimension of the metrics (FID: 2048)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from usp.train.engine import autocast_dtype, setup_runtime

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    if args.paper_sizes and not (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())):
        raise SystemExit("--paper-sizes needs a GPU (XL models take hours per step on a CPU); use --device cuda")
    for flag, value, low in (("--threads", args.threads, 1), ("--metric-samples", args.metric_samples, 10),
                             ("--metric-dim", args.metric_dim, 2)):
        if value is not None and value < low:
            raise SystemExit(f"{flag} must be at least {low}, got {value}")
    runtime = setup_runtime(args.device)  # the training runtime's device choice and backend flags (TF32 on GPU)
    device = runtime.device
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cuda = device.type == "cuda"
    sizes = (GPU_PAPER if args.paper_sizes else GPU_QUICK if args.quick else GPU_FULL) if cuda else \
        (QUICK if args.quick else FULL)
    sizes = replace(sizes, metric_samples=args.metric_samples or sizes.metric_samples,
                    metric_dim=args.metric_dim or sizes.metric_dim)
    if sizes.metric_samples <= sizes.metric_dim:
        raise SystemExit(f"--metric-samples ({sizes.metric_samples}) must exceed --metric-dim ({sizes.metric_dim}): "
                         "FID needs full-rank covariances")
    amp = autocast_dtype(args.amp, device)
    import official

    loaded = {}
    for kind, path in (("usp", args.official_usp), ("dit", args.official_dit), ("sit", args.official_sit)):
        if path is not None:
            try:
                loaders = {"usp": official.load_usp, "dit": official.load_dit, "sit": official.load_sit}
                loaded[kind] = loaders[kind](path)
            except FileNotFoundError as err:
                raise SystemExit(f"--official-{kind}: {err}") from None
    ctx = Context(device=device, sizes=sizes, amp=amp, compile=args.compile, peaks={}, official=loaded)
    torch.manual_seed(0)

    head = [f"## benchmarks/run.py{' --quick' if args.quick else ''}{' --paper-sizes' if args.paper_sizes else ''}", "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads "
            f"(torch.get_num_threads() = {torch.get_num_threads()}), {torch.get_num_interop_threads()} interop",
            f"- device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}; precision: "
            f"{'fp32' if amp is None else amp}" + ("; TF32 matmuls on (as usp trains)" if cuda else "")]
    peak = peak_for(ctx)
    head.append(f"- measured peak ({peak.describe(1e12 if cuda else 1e9, 'TFLOP/s' if cuda else 'GFLOP/s')}); "
                f"MFU divides by the best, {fmt(peak.best / (1e12 if cuda else 1e9))}")
    if loaded:
        head.append("- official code: " + ", ".join(f"{kind} {mod.root}" for kind, mod in loaded.items()))
    waits = {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    head.append("- thread waiting: " + ", ".join(f"{k}={v or 'unset'}" for k, v in waits.items())
                + ("" if all(waits.values()) else " (on a shared CPU set PASSIVE and 4, as benchmarks/run.py does)"))
    if hasattr(os, "getloadavg"):
        head.append(f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    outputs = ["\n".join(head) + "\n"]
    print(outputs[0], flush=True)
    start = time.perf_counter()
    for name in args.only or list(WORKLOADS):
        t0 = time.perf_counter()
        text = WORKLOADS[name](ctx)
        text += f"\n_{name}: {time.perf_counter() - t0:.0f} s_\n"
        outputs.append(text)
        print(text, flush=True)
        gc.collect()
    tail = f"_total: {time.perf_counter() - start:.0f} s"
    if hasattr(os, "getloadavg"):
        tail += f"; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    outputs.append(tail + "_\n")
    print(outputs[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(outputs))


if __name__ == "__main__":
    main(sys.argv[1:])

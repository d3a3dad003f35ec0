"""Time and peak memory of ADM's metrics on random features of evaluation size.

    python benchmarks/bench_metrics.py                     # 50K x 2048 features, 50K x 1008 logits
    python benchmarks/bench_metrics.py --n 10000 --threads 1

Each metric runs in its own process so that its peak resident memory (`ru_maxrss`) is its own; "peak above
inputs" subtracts the resident size measured once the random inputs exist. Features are float32, as the
Inception extractor returns them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run(name: str, n: int, dim: int, classes: int, threads: int | None, device: str, out: mp.Queue) -> None:
    import torch

    from usp.evaluate.metrics import compute_statistics, frechet_distance, inception_score, precision_recall

    if threads:
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(threads)
        except ImportError:
            pass
    rng = np.random.default_rng(0)
    if name == "inception_score":
        inputs = (rng.normal(size=(n, classes)).astype(np.float32) * 3,)
    else:
        inputs = (rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(n, dim)).astype(np.float32) + 0.1)
    base = _current_rss_mib()
    start = time.perf_counter()
    if name.startswith("fid"):
        stats = [compute_statistics(x) for x in inputs]
        value = frechet_distance(*stats[0], *stats[1], matrix_sqrt=name.split("-")[1])
    elif name == "inception_score":
        value = inception_score(inputs[0], kind="logits")
    else:
        value = precision_recall(*inputs, device=device)
    seconds = time.perf_counter() - start
    out.put((name, seconds, _rss_mib(), _rss_mib() - base, value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="samples per set (default 50000, ADM's sample count)")
    parser.add_argument("--dim", type=int, default=2048, help="feature size (default 2048, Inception pool3)")
    parser.add_argument("--classes", type=int, default=1008, help="logit count for IS (default 1008)")
    parser.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: library default)")
    parser.add_argument("--device", default="cpu", help="device for precision/recall distances (default cpu)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: fid-sqrtm fid-eigh inception_score precision_recall")
    args = parser.parse_args()
    if args.n < 4 or args.dim < 1:
        parser.error("--n must be >= 4 (k = 3 neighbours) and --dim >= 1")
    names = args.only or ["fid-sqrtm", "fid-eigh", "inception_score", "precision_recall"]
    shape = f"{args.n} x {args.dim} features, {args.n} x {args.classes} logits, threads={args.threads or 'default'}"
    print(f"ADM metrics on random {shape}")
    print(f"{'metric':<18} {'time (s)':>10} {'peak RSS (MiB)':>15} {'peak above inputs (MiB)':>24}  value", flush=True)
    ctx = mp.get_context("spawn")
    for name in names:  # one process per metric, each row printed as it finishes
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, args.n, args.dim, args.classes, args.threads, args.device, queue))
        proc.start()
        name, seconds, peak, above, value = queue.get()
        proc.join()
        print(f"{name:<18} {seconds:>10.1f} {peak:>15.0f} {above:>24.0f}  {value}", flush=True)


if __name__ == "__main__":
    main()

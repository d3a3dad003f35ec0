"""Evaluation-metrics table: usp.evaluate.metrics on synthetic features, each against a labelled baseline."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_common import Context, fmt, sync, table


def bench_metrics(ctx: Context) -> str:
    """FID / IS / precision-recall of usp.evaluate.metrics on synthetic features, each against a baseline."""
    import baselines as naive

    from usp.evaluate.metrics import (
        IS_SPLIT_SIZE,
        compute_statistics,
        frechet_distance,
        inception_score,
        precision_recall,
    )
    s = ctx.sizes
    n, d = s.metric_samples, s.metric_dim
    rng = np.random.default_rng(0)
    real = rng.standard_normal((n, d), dtype=np.float32)
    fake = rng.standard_normal((n, d), dtype=np.float32) + np.float32(0.02)  # close to real: P and R both high
    logits = rng.standard_normal((n, 1008)).astype(np.float32) * 3
    device = "cuda" if ctx.cuda else "cpu"

    def once(fn: Callable[[], object]) -> tuple[float, object]:
        """Median time of fn: one run when it takes a second or more, else runs until 1 s or 5 runs."""
        times: list[float] = []
        while len(times) < 5 and sum(times) < 1.0:
            start = time.perf_counter()
            out = fn()
            sync(ctx.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    rows = []
    t_usp, (mu1, s1) = once(lambda: compute_statistics(real))
    t_ref, (mu_ref, s_ref) = once(lambda: (real.mean(0, dtype=np.float64), np.cov(real, rowvar=False)))
    err = max(np.abs(mu1 - mu_ref).max(), np.abs(s1 - s_ref).max())
    rows.append(["FID statistics (mean, covariance)", f"{n:,}×{d}", "compute_statistics (chunked float64)",
                 fmt(t_usp), "np.mean + np.cov", fmt(t_ref), fmt(t_usp / t_ref), f"max |Δ| {err:.1e}"])
    mu2, s2 = compute_statistics(fake)
    t_ref, fid_ref = once(lambda: naive.frechet_from_eigenvalues(mu1, s1, mu2, s2))
    methods = ["sqrtm", "eigh"] if "method" in inspect.signature(frechet_distance).parameters else [None]
    for method in methods:
        kwargs = {} if method is None else {"method": method}
        t_usp, fid = once(lambda kwargs=kwargs: frechet_distance(mu1, s1, mu2, s2, **kwargs))
        how = {None: "scipy sqrtm", "sqrtm": 'method="sqrtm" (ADM, default)',
               "eigh": 'method="eigh" (eigh + eigvalsh)'}[method]
        rows.append(["Fréchet distance", f"{d}-d stats", f"frechet_distance, {how}", fmt(t_usp),
                     "Cholesky + eigvalsh (candidate)", fmt(t_ref), fmt(t_usp / t_ref),
                     f"FID {fid:.6f} vs {fid_ref:.6f}"])
    t_usp, score = once(lambda: inception_score(logits))
    t_ref, score_ref = once(lambda: naive.inception_score(logits, IS_SPLIT_SIZE))
    rows.append(["Inception Score", f"{n:,}×1008 logits", "inception_score", fmt(t_usp), "torch softmax, naive",
                 fmt(t_ref), fmt(t_usp / t_ref), f"IS {score:.5f} vs {score_ref:.5f}"])
    t_usp, (precision, recall) = once(lambda: precision_recall(real, fake, device=device))

    def matmul_floor() -> None:
        # the work P/R cannot avoid: the three N×N distance matmuls (real-real, fake-fake, real-fake) in blocks
        a, b = torch.from_numpy(real).to(device), torch.from_numpy(fake).to(device)
        for u, v in ((a, a), (b, b), (a, b)):
            for r0 in range(0, n, 10_000):
                for c0 in range(0, n, 10_000):
                    u[r0 : r0 + 10_000] @ v[c0 : c0 + 10_000].T

    t_ref, _ = once(matmul_floor)
    rows.append(["Precision / recall (k = 3)", f"{n:,}×{d}", "precision_recall (blocked k-NN)", fmt(t_usp),
                 "the distance matmuls alone (floor)", fmt(t_ref), fmt(t_usp / t_ref),
                 f"P {precision:.4f}, R {recall:.4f}"])
    notes = [
        "ratio = usp time ÷ baseline time; calls of a second or more run once, shorter ones up to 5 times "
        f"(median); synthetic Gaussian features on {device}.",
        "the Fréchet candidate is exact for positive-definite Σ1 (eigenvalues of Σ1Σ2 = those of LᵀΣ2L); "
        "see docs/benchmarks.md for what it would change in usp.evaluate.metrics.",
    ]
    if (n, d) != (50_000, 2048):
        notes.append(f"reduced size ({n:,} samples, {d}-d); the paper-scale table is `--metric-samples 50000 "
                     "--metric-dim 2048` (sqrtm is O(D³), P/R O(N²·D)).")
    header = ["metric", "size", "usp", "usp s", "baseline", "baseline s", "ratio", "values"]
    return table("Evaluation metrics (usp.evaluate.metrics)", header, rows, notes)


Rows = list[list[str]]

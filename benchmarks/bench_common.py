"""Shared by every benchmark table: sizes, the interleaved timer, memory and peak probes, table formatting,
the loss check and the training step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

MASK_RATIO = 0.75  # MAE / USP pretraining
LATENT = dict(channels=4, side=32)  # SD-VAE f8 latents of 256 px images
# The SD-VAE encoder/decoder layout (stabilityai/sd-vae-ft-*), built with random weights: only its cost matters.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
)
NOT_MEASURED_GPU = "not measured (no GPU)"


# --------------------------------------------------------------------------------------------
# Sizes of each mode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    pretrain: tuple[tuple[str, int | None], ...]  # (model, batch); None = the largest batch that fits (GPU)
    finetune: tuple[tuple[str, int | None], ...]
    samplers: tuple[str, str]  # (DDPM model, SiT model), random weights
    sample_batch: int
    cache_items: int
    cache_batch: int
    vae_batch: int
    channels_last_px: int  # image side of the channels-last row (the data table always encodes 256 px)
    metric_samples: int
    metric_dim: int
    block_batch: int  # batch of the single-block rows of the switch table
    warmup: int
    iters: int
    sample_iters: int
    matmul_n: int


# CPU quick: ViT-B/2 and DiT/SiT-B/2 (the models of the official-code comparison) at small batches, so that a
# 2-core machine runs the suite in minutes; FULL: the batches of the first measurement (16 and 8).
QUICK = Sizes(pretrain=(("vit_b_2", 4),), finetune=(("dit_b_2", 2), ("sit_b_2", 2)), samplers=("dit_t_2", "sit_t_2"),
              sample_batch=2, cache_items=1024, cache_batch=64, vae_batch=1, channels_last_px=128,
              metric_samples=5000, metric_dim=1024, block_batch=4, warmup=1, iters=7, sample_iters=5, matmul_n=1024)
FULL = Sizes(pretrain=(("vit_b_2", 16),), finetune=(("dit_b_2", 8), ("sit_b_2", 8)), samplers=("dit_s_2", "sit_s_2"),
             sample_batch=4, cache_items=8192, cache_batch=256, vae_batch=4, channels_last_px=256,
             metric_samples=50_000, metric_dim=2048, block_batch=8, warmup=2, iters=7, sample_iters=3, matmul_n=2048)
GPU_QUICK = replace(QUICK, pretrain=(("vit_b_2", 64),), finetune=(("dit_b_2", 32), ("sit_b_2", 32)),
                    samplers=("dit_s_2", "sit_s_2"), sample_batch=16, vae_batch=8, channels_last_px=256,
                    metric_samples=10_000, metric_dim=2048, block_batch=64, warmup=3, iters=5, sample_iters=3,
                    matmul_n=8192)
GPU_FULL = replace(FULL, pretrain=(("vit_b_2", 256), ("vit_l_2", 128)), finetune=(("dit_b_2", 128), ("sit_b_2", 128)),
                   sample_batch=64, vae_batch=32, block_batch=128, warmup=5, iters=10, matmul_n=8192)
# Paper sizes (GPU): the XL models of USP Tables 1-4; DiT/SiT-XL/2 at batch 32 per GPU (issue 18's GPU line).
GPU_PAPER = replace(GPU_FULL, pretrain=(("vit_b_2", None), ("vit_l_2", None)),
                    finetune=(("dit_xl_2", 32), ("sit_xl_2", 32)), samplers=("dit_xl_2", "sit_xl_2"), sample_batch=32)
BATCH_CANDIDATES = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 16, 8)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    amp: torch.dtype | None
    compile: bool
    peaks: dict[str, Peak]  # measured matmul peak by precision name ('fp32', 'bf16')
    official: dict[str, object]  # loaded official checkouts by kind ('usp', 'dit', 'sit'); see official.py

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Timing, memory, peak
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def _release_free_heap() -> None:
    """Hand memory that glibc keeps after frees back to the OS, so the next RSS window starts from live memory
    only (otherwise a step can reuse pages an earlier one freed and look as if it needed none)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak(device: torch.device) -> int | None:
    """Start a peak-memory window; returns the resident baseline (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _release_free_heap()
    try:  # writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None


def _peak_since(device: torch.device, base: int | None) -> int | None:
    if base is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    return max(_status_bytes("VmHWM") - base, 0)


@dataclass
class Timing:
    times: list[float]
    peak_bytes: int | None
    first: object  # what the first warm-up call returned

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int,
            min_seconds: float = 0.0) -> dict[str, Timing]:
    """Warm each fn up, then time all of them round-robin: `iters` rounds, continued (up to 4 × iters) while the
    timed rounds add up to less than `min_seconds` per fn, so that cheap calls get more samples against load noise.
    Memory and `first` come from each fn's first call (a warm-up call, or the first timed one when warmup is 0;
    its memory probe stays outside the timer)."""
    firsts: dict[str, object] = {}
    peaks: dict[str, int | None] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str, timed: bool) -> None:
        first = name not in firsts
        if first:
            gc.collect()
            base = _reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out = fns[name]()
        sync(device)
        if timed:
            times[name].append(time.perf_counter() - start)
        if first:
            firsts[name], peaks[name] = out, _peak_since(device, base)

    for name in fns:
        for _ in range(warmup):
            call(name, timed=False)
    rounds = 0
    while rounds < iters or (rounds < 4 * iters and sum(map(sum, times.values())) < min_seconds * len(fns)):
        for name in fns:
            call(name, timed=True)
        rounds += 1
    return {name: Timing(times[name], peaks.get(name), firsts.get(name)) for name in fns}


@dataclass
class Peak:
    """Matmul FLOP/s per CPU thread count (GPU: one entry), each as (best, median) of the timed calls."""

    precision: str
    n: int
    by_threads: dict[int, tuple[float, float]]

    @property
    def best(self) -> float:
        """The divisor of MFU: the fastest matmul seen at any thread count up to the benchmark's, so that the
        model step (which runs at that thread count) cannot exceed it unless the count is wrong."""
        return max(best for best, _ in self.by_threads.values())

    def describe(self, unit: float, unit_name: str) -> str:
        parts = [f"{threads} thread{'s' if threads > 1 else ''} {fmt(b / unit)} (median {fmt(m / unit)})"
                 for threads, (b, m) in sorted(self.by_threads.items())]
        return f"{self.precision} {self.n}² matmul, best of the timed calls: " + ", ".join(parts) + f" {unit_name}"


def measure_peak(device: torch.device, dtype: torch.dtype, n: int, max_threads: int, iters: int = 7) -> Peak:
    """Matmul FLOP/s (2n³ per call) on the GPU, or on the CPU at every thread count 1 … max_threads.

    The best call, not the median, is the peak: on a shared CPU the median is dragged down by other processes,
    and a median peak below what one model step reaches is what made MFU exceed 100 % before.
    """
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    counts = [0] if device.type == "cuda" else list(range(1, max_threads + 1))
    before = torch.get_num_threads()
    by_threads: dict[int, tuple[float, float]] = {}
    try:
        for threads in counts:
            if threads:
                torch.set_num_threads(threads)
            t = measure({"mm": lambda: a @ b}, device, warmup=2, iters=iters)["mm"]
            by_threads[threads or 1] = (2 * n**3 / min(t.times), 2 * n**3 / t.median)
    finally:
        torch.set_num_threads(before)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return Peak(name, n, by_threads)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def fmt(x: float | int | None, digits: int = 3) -> str:
    """Numbers to `digits` significant figures, thousands grouped; None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, int) or (abs(x) >= 10 ** (digits - 1) and float(x).is_integer()):
        return f"{int(round(x)):,}"
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0)
    return f"{x:,.{decimals}f}"


def mib(n: int | None) -> str:
    return "n/a" if n is None else fmt(n / 2**20)


def table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = [f"### {title}", ""]
    lines += [f"| {' | '.join(header)} |", f"|{'|'.join(' --- ' for _ in header)}|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Helpers shared by the workloads
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """Full-fp32 matmuls for the loss check (TF32 would blur a 1e-4 comparison); restores the flag after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def randomise_zero_init(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Redraw DiT's zero-initialised adaLN and output layers: at zero init every block is the identity and the
    output is 0, which makes a loss comparison vacuous and an ODE solver's step count meaningless."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.ndim >= 1 and not param.any():
                param.normal_(0.0, std)
    return model


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
               ctx: Context) -> Callable[[], torch.Tensor]:
    """forward + backward + optimizer step, under the run's autocast; the RNG is reseeded first, so that masking,
    label dropout and drawn noise are the same in every implementation."""

    def step() -> torch.Tensor:
        torch.manual_seed(1234)
        with torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def check_losses(usp_loss: Callable[[], torch.Tensor], ref_loss: Callable[[], torch.Tensor],
                 what: str = "the official code") -> tuple[float, float]:
    """Both losses from the same weights and inputs in fp32, before any step; raises if they differ."""
    with torch.no_grad(), exact_matmuls():
        torch.manual_seed(1234)
        a = float(usp_loss())
        torch.manual_seed(1234)
        b = float(ref_loss())
    if not abs(a - b) <= 1e-4 * max(1.0, abs(a)):
        raise AssertionError(f"usp loss {a:.7f} and {what}'s {b:.7f} differ by {abs(a - b):.2e} > 1e-4: "
                             "the two no longer compute the same function")
    return a, abs(a - b)


def fit_batch(make_steps: Callable[[int], dict[str, Callable[[], object]]], candidates: tuple[int, ...]) -> int:
    """Largest batch at which every step of make_steps(batch) runs without running out of GPU memory."""
    for batch in candidates:
        try:
            for step in make_steps(batch).values():
                step()
            return batch
        except torch.cuda.OutOfMemoryError:
            pass
        # after the except block: its traceback, and the activations its frames hold, are gone
        gc.collect()
        torch.cuda.empty_cache()
    raise RuntimeError(f"not even a batch of {candidates[-1]} fits on this GPU")


def peak_for(ctx: Context) -> Peak:
    """The measured matmul peak of the run's precision, up to its thread count (measured once per run)."""
    key = "bf16" if ctx.amp == torch.bfloat16 else "fp32"
    if key not in ctx.peaks:
        dtype = torch.bfloat16 if key == "bf16" else torch.float32
        ctx.peaks[key] = measure_peak(ctx.device, dtype, ctx.sizes.matmul_n, torch.get_num_threads())
    return ctx.peaks[key]


def pair_ratios(a: Timing, b: Timing) -> list[float]:
    """a ÷ b for each interleaved round (a_i and b_i ran back to back, so load drift hits both alike)."""
    return [x / y for x, y in zip(a.times, b.times)]


def ratio_cell(ratios: list[float]) -> str:
    """median [min – max] of per-round ratios."""
    return f"{fmt(statistics.median(ratios))} [{fmt(min(ratios))} – {fmt(max(ratios))}]"


def training_rows(ctx: Context, label: str, batch: int, flops_per_sample: float, timings: dict[str, Timing],
                  losses: dict[str, tuple[float, float]]) -> list[list[str]]:
    """One row per implementation timed (keys of `timings`: 'usp' and, when given, 'official')."""
    peak = peak_for(ctx)
    vendor = device_peak(ctx)
    rows = []
    for impl, t in timings.items():
        achieved = flops_per_sample * batch / t.median
        mfu_cells = f"{fmt(100 * achieved / peak.best, 2)} % of measured {peak.precision}"
        if vendor is not None:
            mfu_cells += f", {fmt(100 * achieved / vendor, 2)} % of the data sheet"
        loss = losses.get(impl)
        rows.append([label, IMPL_NAMES[impl], str(batch), fmt(1e3 * t.median), fmt(batch / t.median),
                     f"{fmt(achieved / (1e12 if ctx.cuda else 1e9))} {'TFLOP/s' if ctx.cuda else 'GFLOP/s'}",
                     mfu_cells, mib(t.peak_bytes), "n/a" if loss is None else f"{loss[0]:.6f} (Δ {loss[1]:.1e})",
                     ratio_cell(pair_ratios(t, timings["official"])) if "official" in timings else "n/a"])
    return rows


def device_peak(ctx: Context) -> float | None:
    from usp.train.flops import device_peak_flops

    return device_peak_flops(ctx.device, "bf16" if ctx.amp == torch.bfloat16 else "fp32")


IMPL_NAMES = {"official": "official code", "usp": "usp"}
TRAIN_HEADER = ["model", "implementation", "batch", "step ms", "images/s", "achieved", "MFU", "step memory MiB",
                "loss (Δ official)", "usp ÷ official [min – max]"]
TRAIN_NOTES = [
    "usp ÷ official: step time of usp over the official code's, per interleaved round (official, usp, official, …"
    "); median [min – max] of the rounds (target ≤ 0.95).",
    "FLOPs: usp.train.flops (3 × forward, forward = Σ 2·weights·tokens + Σ_layers 4·T²·D); MFU divides by the best "
    "measured matmul of the run's precision at any thread count up to the run's (see the header).",
    "step memory: peak above the resident set before the (warm-up) step: activations, gradients, optimizer state.",
]


def timing_note(ctx: Context, what: str = "steps") -> str:
    s = ctx.sizes
    return f"median of {s.iters} timed {what} after {s.warmup} warm-up, implementations interleaved."


Rows = list[list[str]]


def switch_row(rows: Rows, name: str, workload: str, off: Timing, on: Timing, note: str = "") -> None:
    rows.append([name, workload, fmt(1e3 * off.median), fmt(1e3 * on.median), fmt(on.median / off.median), note])


SWITCH_MIN_SECONDS = 2.0  # sub-second rows get extra rounds (see `measure`)


def pair(ctx: Context, off: Callable[[], object], on: Callable[[], object]) -> tuple[Timing, Timing]:
    t = measure({"off": off, "on": on}, ctx.device, ctx.sizes.warmup, ctx.sizes.iters, SWITCH_MIN_SECONDS)
    return t["off"], t["on"]


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"



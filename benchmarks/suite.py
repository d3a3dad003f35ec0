"""`python benchmarks/run.py`: how fast usp trains, samples, reads latents and scores samples, each against a baseline.

Every table row is timed in the same process as the baseline it is divided by (the ratio column), and
rows that are compared are timed interleaved (a, b, a, b, …) after their warm-up, so load drift on a
shared machine hits both alike. Times are medians of the timed iterations.

FLOPs are counted analytically (`mae_step_flops`, `dit_step_flops`), per image:

    forward = Σ_linear 2 · weight_elements · tokens_through_it  +  Σ_layers 4 · T² · D
    step    = 3 · forward          (backward ≈ 2 × forward)

where a block's linears are qkv, proj, fc1, fc2 (≈ 12 D² for MLP ratio 4) applied to its T tokens,
4 T² D is QKᵀ plus attention·V, and biases, norms, softmax and elementwise maths are not counted.
The patch embedding sees all L patches; the MAE encoder sees 1 + L_keep tokens, its decoder 1 + L;
DiT's adaLN and embedder MLPs act on one conditioning vector per image. Achieved FLOP/s is that count
over the measured step time, and "% of peak" divides it by a large matmul timed on the same device.

Memory is the peak the step adds above what was resident before it (activations, gradients, AdamW
state), measured on the warm-up step: CPU from /proc/self/status VmHWM after `malloc_trim` and a reset through
/proc/self/clear_refs, GPU from torch.cuda.max_memory_allocated.

The naive references and the other baselines live in benchmarks/reference_models.py of the source checkout.
`python benchmarks/run.py` also sets the thread-waiting policy that a shared CPU needs (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import inspect
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
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


QUICK = Sizes(pretrain=(("vit_s_2", 2), ("vit_b_2", 1)), finetune=(("dit_b_2", 1),), samplers=("dit_t_2", "sit_t_2"),
              sample_batch=2, cache_items=1024, cache_batch=64, vae_batch=1, channels_last_px=128,
              metric_samples=5000, metric_dim=1024, block_batch=4, warmup=1, iters=3, sample_iters=1, matmul_n=2048)
FULL = Sizes(pretrain=(("vit_s_2", 8), ("vit_b_2", 8)), finetune=(("dit_b_2", 4),), samplers=("dit_s_2", "sit_s_2"),
             sample_batch=4, cache_items=8192, cache_batch=256, vae_batch=4, channels_last_px=256,
             metric_samples=50_000, metric_dim=2048, block_batch=8, warmup=2, iters=5, sample_iters=3, matmul_n=4096)
GPU_QUICK = replace(QUICK, pretrain=(("vit_s_2", 64), ("vit_b_2", 64)), finetune=(("dit_b_2", 32),),
                    samplers=("dit_s_2", "sit_s_2"), sample_batch=16, vae_batch=8, channels_last_px=256,
                    metric_samples=10_000, metric_dim=2048, block_batch=64, warmup=3, iters=5, sample_iters=3,
                    matmul_n=8192)
GPU_FULL = replace(FULL, pretrain=(("vit_s_2", 256), ("vit_b_2", 256)), finetune=(("dit_b_2", 128),), sample_batch=64,
                   vae_batch=32, block_batch=128, warmup=5, iters=10, matmul_n=8192)
# Paper sizes (GPU): the XL models of USP Tables 1-4 at the largest batch that fits.
GPU_PAPER = replace(GPU_FULL, pretrain=(("vit_xl_2", None),), finetune=(("dit_xl_2", None), ("sit_xl_2", None)))
BATCH_CANDIDATES = (1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 16, 8)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    amp: torch.dtype | None
    compile: bool
    peaks: dict[str, float]  # measured matmul FLOP/s by dtype name

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Timing, memory, peak
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
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
        _sync(device)
        start = time.perf_counter()
        out = fns[name]()
        _sync(device)
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


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, iters: int = 5) -> float:
    """FLOP/s of an n×n×n matmul in `dtype` (2n³ FLOPs), median of `iters` after warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    timing = measure({"mm": lambda: a @ b}, device, warmup=2, iters=iters)["mm"]
    return 2 * n**3 / timing.median


# --------------------------------------------------------------------------------------------
# FLOP counting (formula in the module docstring)
# --------------------------------------------------------------------------------------------


def block_forward_flops(block: nn.Module, tokens: int) -> float:
    """One transformer block on `tokens` tokens of one image: 2·(qkv+proj+fc1+fc2 weights)·T + 4·T²·D."""
    attn, mlp = block.attn, block.mlp
    weights = attn.qkv.weight.numel() + attn.proj.weight.numel() + mlp.fc1.weight.numel() + mlp.fc2.weight.numel()
    return 2.0 * weights * tokens + 4.0 * tokens**2 * attn.proj.weight.shape[0]


def mae_step_flops(model: nn.Module, batch: int, mask_ratio: float = MASK_RATIO) -> float:
    """Training-step FLOPs (3 × forward) of usp's MaskedLatentAutoencoder on `batch` latents."""
    length = model.num_patches
    enc_tokens, dec_tokens = 1 + int(length * (1 - mask_ratio)), 1 + length  # cls + visible; cls + all
    forward = 2.0 * model.patch_embed.proj.weight.numel() * length
    forward += sum(block_forward_flops(b, enc_tokens) for b in model.blocks)
    forward += 2.0 * model.decoder_embed.weight.numel() * enc_tokens
    forward += sum(block_forward_flops(b, dec_tokens) for b in model.decoder_blocks)
    forward += 2.0 * model.decoder_pred.weight.numel() * dec_tokens
    return 3.0 * forward * batch


def mae_tokens(model: nn.Module, mask_ratio: float = MASK_RATIO) -> int:
    """Tokens one image puts through the transformer: encoder (cls + visible) plus decoder (cls + all)."""
    return (1 + int(model.num_patches * (1 - mask_ratio))) + (1 + model.num_patches)


def dit_step_flops(model: nn.Module, batch: int) -> float:
    """Training-step FLOPs (3 × forward) of usp's DiT on `batch` latents; conditioning MLPs act on one vector."""
    length = model.grid_size**2
    forward = 2.0 * model.x_embedder.proj.weight.numel() * length
    forward += 2.0 * sum(m.weight.numel() for m in model.t_embedder.mlp if isinstance(m, nn.Linear))
    for block in model.blocks:
        forward += block_forward_flops(block, length) + 2.0 * block.adaLN_modulation[1].weight.numel()
    final = model.final_layer
    forward += 2.0 * final.linear.weight.numel() * length + 2.0 * final.adaLN_modulation[1].weight.numel()
    return 3.0 * forward * batch


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


def reference_models() -> ModuleType:
    """benchmarks/reference_models.py of the source checkout (it is not part of the installed package)."""
    path = Path(__file__).resolve().parent / "reference_models.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the suite compares against the naive models of the source "
                                "checkout; run it from a clone of the repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location("usp_bench_reference_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def train_step(loss_fn: Callable[[], torch.Tensor], model: nn.Module, ctx: Context) -> Callable[[], torch.Tensor]:
    """forward + backward + AdamW step, with usp's parameter groups and optimizer factory (as training uses)."""
    from usp.train.optim import build_optimizer, param_groups

    optimizer = build_optimizer("adamw", param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))

    def step() -> torch.Tensor:
        torch.manual_seed(1234)  # DiT's label dropout draws the same labels in both implementations
        with torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def check_losses(usp_loss: Callable[[], torch.Tensor], ref_loss: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Both losses from the same weights and inputs in fp32, before any step; raises if they differ."""
    with torch.no_grad(), exact_matmuls():
        torch.manual_seed(1234)
        a = float(usp_loss())
        torch.manual_seed(1234)
        b = float(ref_loss())
    if not abs(a - b) <= 1e-4 * max(1.0, abs(a)):
        raise AssertionError(f"usp loss {a:.7f} and the naive reference's {b:.7f} differ by {abs(a - b):.2e} > 1e-4: "
                             "the two models no longer compute the same function")
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


def peak_for(ctx: Context) -> tuple[str, float]:
    key = "bf16" if ctx.amp == torch.bfloat16 else "fp32"
    if key not in ctx.peaks:
        dtype = torch.bfloat16 if key == "bf16" else torch.float32
        ctx.peaks[key] = peak_matmul_flops(ctx.device, dtype, ctx.sizes.matmul_n)
    return key, ctx.peaks[key]


def training_rows(ctx: Context, label: str, batch: int, flops: float, tokens_per_image: int,
                  timings: dict[str, Timing], losses: tuple[float, float]) -> list[list[str]]:
    peak_name, peak = peak_for(ctx)
    unit, scale = ("TFLOP/s", 1e12) if ctx.cuda else ("GFLOP/s", 1e9)
    rows = []
    for impl in ("reference", "usp"):
        t = timings[impl]
        achieved = flops / t.median
        rows.append([label, "naive reference" if impl == "reference" else "usp", str(batch), fmt(1e3 * t.median),
                     fmt(batch / t.median), fmt(batch * tokens_per_image / t.median), f"{fmt(achieved / scale)} {unit}",
                     f"{fmt(100 * achieved / peak, 2)} % of {peak_name}", mib(t.peak_bytes),
                     f"{losses[0]:.6f}" if impl == "usp" else f"Δ {losses[1]:.1e}",
                     fmt(t.median / timings["reference"].median)])
    return rows


TRAIN_HEADER = ["model", "implementation", "batch", "step ms", "images/s", "tokens/s", "achieved", "MFU",
                "step memory MiB", "loss (Δ ref)", "ratio"]
TRAIN_NOTES = [
    "ratio = step time ÷ the naive reference's step time at the same configuration (≤ 1: usp is no slower).",
    "FLOPs: 3 × forward, forward = Σ 2·weights·tokens + Σ_layers 4·T²·D (suite.py); MFU against the measured "
    "matmul peak of the precision the step runs in.",
    "step memory: peak above the resident set before the (warm-up) step: activations, gradients, AdamW state.",
]


def _timing_note(ctx: Context, what: str = "steps") -> str:
    s = ctx.sizes
    return f"median of {s.iters} timed {what} after {s.warmup} warm-up, implementations interleaved."


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def _pretrain_rows(ctx: Context, naive: ModuleType, name: str, batch: int | None) -> list[list[str]]:
    from usp.models import create_model

    torch.manual_seed(0)
    model = create_model(name, latent_size=LATENT["side"], in_channels=LATENT["channels"]).to(ctx.device)
    ref = naive.NaiveMAE.from_usp(model).to(ctx.device)  # before any step: the same weights
    n_usp, n_ref = (sum(p.numel() for p in m.parameters()) for m in (model, ref))
    if n_usp != n_ref:
        raise AssertionError(f"the reference has {n_ref} parameters, usp's {name} {n_usp}")

    def inputs(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(b)
        x = torch.randn(b, LATENT["channels"], LATENT["side"], LATENT["side"], generator=gen)
        return x.to(ctx.device), torch.rand(b, model.num_patches, generator=gen).to(ctx.device)

    x1, n1 = inputs(1)
    losses = check_losses(lambda: model(x1, MASK_RATIO, noise=n1)[0], lambda: ref(x1, MASK_RATIO, n1))

    def steps(b: int) -> dict[str, Callable[[], torch.Tensor]]:
        x, noise = inputs(b)
        return {"reference": train_step(lambda: ref(x, MASK_RATIO, noise), ref, ctx),
                "usp": train_step(lambda: model(x, MASK_RATIO, noise=noise)[0], model, ctx)}

    batch = batch or fit_batch(steps, BATCH_CANDIDATES)
    timings = measure(steps(batch), ctx.device, ctx.sizes.warmup, ctx.sizes.iters)
    return training_rows(ctx, f"MAE {name}", batch, mae_step_flops(model, batch), mae_tokens(model), timings, losses)


def bench_pretrain(ctx: Context) -> str:
    """MAE pretraining step of usp vs the naive reference, on 32×32×4 latents with mask ratio 0.75."""
    naive = reference_models()
    rows = [row for name, batch in ctx.sizes.pretrain for row in _pretrain_rows(ctx, naive, name, batch)]
    amp = "fp32" if ctx.amp is None else f"{ctx.amp} autocast"
    notes = TRAIN_NOTES + [
        f"{amp}; {_timing_note(ctx)} Loss checked in fp32 on one latent before timing (|Δ| ≤ 1e-4 asserted).",
        "tokens/s counts encoder tokens (cls + 64 visible) plus decoder tokens (cls + 256) per image.",
    ]
    return table("Pretraining step (masked latent modeling, 32×32×4 latents, mask 0.75, AdamW)", TRAIN_HEADER,
                 rows, notes)


def _finetune_rows(ctx: Context, naive: ModuleType, name: str, batch: int | None) -> list[list[str]]:
    from usp.diffusion import create_diffusion, create_transport
    from usp.models import create_model

    torch.manual_seed(0)
    model = randomise_zero_init(create_model(name, input_size=LATENT["side"])).to(ctx.device)
    ref = naive.NaiveDiT.from_usp(model).to(ctx.device)
    sit = name.startswith("sit")
    diffusion, transport = create_diffusion(None), create_transport()

    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(b)
        x = torch.randn(b, LATENT["channels"], LATENT["side"], LATENT["side"], generator=gen)
        t = torch.rand(b, generator=gen) if sit else torch.randint(0, 1000, (b,), generator=gen)
        noise, y = torch.randn(x.shape, generator=gen), torch.randint(0, 1000, (b,), generator=gen)
        return tuple(v.to(ctx.device) for v in (x, t, noise, y))

    def loss_of(net: nn.Module, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        if sit:
            return transport.training_losses(lambda a, s: net(a, s, y), x, noise=noise, t=t)["loss"].mean()
        return diffusion.training_losses(lambda a, s: net(a, s, y), x, t, noise)["loss"].mean()

    one = inputs(1)
    losses = check_losses(lambda: loss_of(model, *one), lambda: loss_of(ref, *one))

    def steps(b: int) -> dict[str, Callable[[], torch.Tensor]]:
        batch_inputs = inputs(b)
        return {"reference": train_step(lambda: loss_of(ref, *batch_inputs), ref, ctx),
                "usp": train_step(lambda: loss_of(model, *batch_inputs), model, ctx)}

    batch = batch or fit_batch(steps, BATCH_CANDIDATES)
    timings = measure(steps(batch), ctx.device, ctx.sizes.warmup, ctx.sizes.iters)
    label = f"{'SiT' if sit else 'DiT'} {name} ({'linear velocity' if sit else 'DDPM hybrid'})"
    return training_rows(ctx, label, batch, dit_step_flops(model, batch), model.grid_size**2, timings, losses)


def bench_finetune(ctx: Context) -> str:
    """DiT (DDPM hybrid loss) / SiT (linear velocity) fine-tuning step of usp vs the naive reference."""
    naive = reference_models()
    rows = [row for name, batch in ctx.sizes.finetune for row in _finetune_rows(ctx, naive, name, batch)]
    amp = "fp32" if ctx.amp is None else f"{ctx.amp} autocast"
    notes = TRAIN_NOTES + [
        f"{amp}; {_timing_note(ctx)} Loss (create_diffusion().training_losses, DiT's learned-sigma hybrid loss) "
        "checked in fp32 on one latent before timing.",
        "DiT's zero-initialised adaLN and output layers are redrawn from N(0, 0.02²) so that every block takes part "
        "(as after transfer from USP weights); label dropout 0.1 draws the same labels in both.",
    ]
    return table("Fine-tuning step (32×32×4 latents, AdamW)", TRAIN_HEADER, rows, notes)


class NetworkClock:
    """Accumulates the time spent inside a model's forward, by wrapping the forward of this (bench-local) instance;
    forward_with_cfg calls self.forward, so guided calls are timed too."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.seconds, self.calls = 0.0, 0
        inner = model.forward

        def forward(*args: object, **kwargs: object) -> torch.Tensor:
            _sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        model.forward = forward

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def bench_sampling(ctx: Context) -> str:
    """Images/s of usp's samplers, and the share of their time spent outside the network (sampler overhead)."""
    from usp.diffusion import create_diffusion, create_transport, ddim_sample_loop, p_sample_loop, sample_ode
    from usp.models import create_model
    from usp.sample.guided import guided_model_fn

    s = ctx.sizes
    torch.manual_seed(0)
    dit_name, sit_name = s.samplers
    dit = randomise_zero_init(create_model(dit_name, input_size=LATENT["side"])).to(ctx.device).eval()
    sit = randomise_zero_init(create_model(sit_name, input_size=LATENT["side"])).to(ctx.device).eval()
    clocks = {dit_name: NetworkClock(dit, ctx.device), sit_name: NetworkClock(sit, ctx.device)}
    b = s.sample_batch
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(b, LATENT["channels"], LATENT["side"], LATENT["side"], generator=gen).to(ctx.device)
    labels = torch.randint(0, 1000, (b,), generator=gen).to(ctx.device)
    dit_fn, sit_fn = guided_model_fn(dit, labels, 1.0, None), guided_model_fn(sit, labels, 1.0, None)
    cfg_fn = guided_model_fn(dit, labels, 4.0, 3)
    transport = create_transport()

    # Each sampler returns its number of function evaluations (NFE).
    def ddpm() -> int:
        p_sample_loop(create_diffusion("250"), dit_fn, noise)
        return 250

    def ddim(model_fn: Callable) -> Callable[[], int]:
        def run() -> int:
            ddim_sample_loop(create_diffusion("ddim50"), model_fn, noise)
            return 50

        return run

    samplers: dict[str, tuple[str, Callable[[], int]]] = {
        "DDPM-250": (dit_name, ddpm),
        "DDIM-50": (dit_name, ddim(dit_fn)),
        "DDIM-50, CFG 4.0 (2× batch per NFE)": (dit_name, ddim(cfg_fn)),
        "SiT ODE dopri5 (atol 1e-6, rtol 1e-3)": (sit_name, lambda: sample_ode(transport, sit_fn, noise)[1]),
        "SiT ODE Euler-50 (50 grid points)": (
            sit_name, lambda: sample_ode(transport, sit_fn, noise, method="euler", num_steps=50)[1]),
    }
    rows = []
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
        ddim_sample_loop(create_diffusion("5"), dit_fn, noise)  # warm-up: kernels and sampler code paths
        sample_ode(transport, sit_fn, noise, method="euler", num_steps=3)
        for name, (model_name, fn) in samplers.items():
            clock = clocks[model_name]
            totals, network = [], []
            while len(totals) < s.sample_iters or (len(totals) < 4 * s.sample_iters and sum(totals) < 3.0):
                clock.reset()
                _sync(ctx.device)
                start = time.perf_counter()
                nfe = fn()
                _sync(ctx.device)
                totals.append(time.perf_counter() - start)
                network.append(clock.seconds)
            seconds, inside = statistics.median(totals), statistics.median(network)
            rows.append([name, model_name, str(b), str(nfe), fmt(b / seconds), fmt(seconds), fmt(1e3 * seconds / nfe),
                         fmt(1e3 * inside / nfe), fmt(seconds / inside)])
    notes = [
        "ratio = sampler wall time ÷ time inside the network's forward during the same run (≥ 1; the excess is the "
        "sampler's own work: schedule look-ups, noise, solver state, CFG mixing), so load drift cancels.",
        "random weights (zero-initialised layers redrawn from N(0, 0.02²)); dopri5's adaptive NFE depends on the "
        f"weights, so it is reported, not fixed. Median of {s.sample_iters} timed run(s) (more, up to "
        f"{4 * s.sample_iters}, while under 3 s) after a warm-up run.",
    ]
    header = ["sampler", "model", "batch", "NFE", "images/s", "s per batch", "ms per NFE", "network ms per NFE",
              "ratio"]
    return table(f"Sampling (32×32×4 latents, {'fp32' if ctx.amp is None else ctx.amp})", header, rows, notes)


class _RandomMoments(nn.Module):
    """Stands in for the VAE when filling the benchmark cache: random moments of the right shape, no encoding."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.channels, self.side = channels, side
        self.generator = torch.Generator().manual_seed(0)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        moments = torch.randn(images.shape[0], 2 * self.channels, self.side, self.side, generator=self.generator)
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=moments))


class _BlankImages(torch.utils.data.Dataset):
    """Items as build_cache expects them; the stand-in VAE ignores the (tiny) images."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(3, 8, 8), "label": index % 1000}


def sd_vae_space() -> nn.Module:
    """An SD-VAE-sized latent space with random weights (no download)."""
    from diffusers import AutoencoderKL

    from usp.latent.vae import LATENT_SPACES, LatentSpace

    torch.manual_seed(0)
    return LatentSpace("sd-vae-ft-ema", AutoencoderKL(**SD_VAE_CONFIG), LATENT_SPACES["sd-vae-ft-ema"].scale)


def bench_data(ctx: Context) -> str:
    """Latents from usp's cache (the training data path) vs encoding 256 px images with an SD-VAE-sized encoder."""
    from torch.utils.data import DataLoader

    from usp.config import load_config
    from usp.data.sampler import ResumableSampler, SeededDataset
    from usp.latent.cache import build_cache
    from usp.latent.data import LatentData
    from usp.latent.vae import LatentSpace

    s = ctx.sizes
    with tempfile.TemporaryDirectory() as folder:
        stub = LatentSpace("sd-vae-ft-ema", _RandomMoments(LATENT["channels"], LATENT["side"]), 0.18215)
        build_cache(_BlankImages(s.cache_items), stub, 256, folder, "train", batch_size=256, progress=False)
        config = load_config(None, ["latent.space=sd-vae-ft-ema", f"latent.cache={folder}", "data.image_size=256",
                                    "latent.sample_posterior=true"])
        data = LatentData(config, "train", augment=True)  # flip coin and posterior sample, as training draws them
        loader = DataLoader(SeededDataset(data.dataset, data.extras), batch_size=s.cache_batch, drop_last=True,
                            sampler=ResumableSampler(len(data.dataset), seed=0), num_workers=0,
                            pin_memory=ctx.cuda)

        def read_epoch() -> int:
            count = 0
            for batch in loader:
                batch = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                count += data.latents(batch).shape[0]
            return count

        space = sd_vae_space().to(ctx.device)
        images = torch.rand(s.vae_batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(ctx.device)
        images = images * 2 - 1

        def encode() -> torch.Tensor:
            return space.encode(images)

        timings = measure({"cache": read_epoch, "encode": encode}, ctx.device, s.warmup, s.iters)
    cache_rate = timings["cache"].first / timings["cache"].median
    encode_rate = s.vae_batch / timings["encode"].median
    rows = [
        [f"latent cache → latents (DataLoader, {s.cache_items} items, flip + posterior sample)", str(s.cache_batch),
         fmt(cache_rate), fmt(1e3 / cache_rate, 3), "1.00"],
        ["SD-VAE-sized AutoencoderKL encode of 256 px images (on the fly)", str(s.vae_batch), fmt(encode_rate),
         fmt(1e3 / encode_rate), fmt(cache_rate / encode_rate)],
    ]
    verdict = "met" if cache_rate / encode_rate >= 20 else "NOT met"
    notes = [
        f"ratio = cost per latent ÷ the cache's cost per latent (target ≥ 20: {verdict}).",
        "cache: usp's LatentCacheDataset + SeededDataset + ResumableSampler + LatentData.latents, one process "
        "(num_workers=0), file in the page cache; encode: random weights, image decoding and augmentation not "
        "counted, so the real saving is larger.",
        f"{_timing_note(ctx, 'epochs / batches')}",
    ]
    return table("Data path: cached latents vs on-the-fly VAE encoding", ["path", "batch", "images/s", "ms/image",
                                                                          "ratio"], rows, notes)


def bench_metrics(ctx: Context) -> str:
    """FID / IS / precision-recall of usp.evaluate.metrics on synthetic features, each against a baseline."""
    from usp.evaluate.metrics import (
        IS_SPLIT_SIZE,
        compute_statistics,
        frechet_distance,
        inception_score,
        precision_recall,
    )

    naive = reference_models()
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
            _sync(ctx.device)
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


def _switch_row(rows: Rows, name: str, workload: str, off: Timing, on: Timing, note: str = "") -> None:
    rows.append([name, workload, fmt(1e3 * off.median), fmt(1e3 * on.median), fmt(on.median / off.median), note])


SWITCH_MIN_SECONDS = 2.0  # sub-second rows get extra rounds (see `measure`)


def _pair(ctx: Context, off: Callable[[], object], on: Callable[[], object]) -> tuple[Timing, Timing]:
    t = measure({"off": off, "on": on}, ctx.device, ctx.sizes.warmup, ctx.sizes.iters, SWITCH_MIN_SECONDS)
    return t["off"], t["on"]


def _switch_block(ctx: Context, rows: Rows) -> None:
    """Attention kernel, bf16 autocast and torch.compile on one block of the MAE decoder's shape."""
    from usp.models.vit import Block

    naive = reference_models()
    dev = ctx.device
    torch.manual_seed(0)
    block = Block(512, 16).to(dev)  # the MAE decoder block: 512 wide, 16 heads, 1 + 256 tokens
    x = torch.randn(ctx.sizes.block_batch, 257, 512, device=dev)

    def block_step(explicit: bool = False, dtype: torch.dtype | None = None, fn: Callable | None = None,
                   inputs: torch.Tensor = x) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                if explicit:  # usp's Block.forward with the attention spelt out
                    h = inputs + naive.explicit_attention(block.attn, block.norm1(inputs))
                    out = h + block.mlp(block.norm2(h))
                else:
                    out = (block if fn is None else fn)(inputs)
            out.float().square().mean().backward()
            block.zero_grad(set_to_none=True)

        return run

    workload = f"Block 512 wide, 16 heads, {ctx.sizes.block_batch}×257 tokens, fwd+bwd"
    _switch_row(rows, "attention: explicit softmax → F.scaled_dot_product_attention (usp)", workload,
                *_pair(ctx, block_step(explicit=True), block_step()))
    if ctx.cuda or _cpu_has_bf16():
        _switch_row(rows, f"bf16 autocast ({dev.type})", workload,
                    *_pair(ctx, block_step(), block_step(dtype=torch.bfloat16)))
    else:  # emulated bf16 is an order of magnitude slower: one sample keeps the row cheap
        one = x[:1]
        _switch_row(rows, "bf16 autocast (cpu)", workload.replace(f"{ctx.sizes.block_batch}×", "1×"),
                    *_pair(ctx, block_step(inputs=one), block_step(dtype=torch.bfloat16, inputs=one)),
                    "this CPU has no native bf16 (no AVX512-BF16 / AMX): emulated")
    if not ctx.cuda:
        rows.append(["bf16 autocast (cuda)", workload, NOT_MEASURED_GPU, "", "", ""])
    if ctx.compile:
        compiled = torch.compile(block)
        start = time.perf_counter()
        block_step(fn=compiled)()
        compile_s = time.perf_counter() - start
        _switch_row(rows, "torch.compile", workload, *_pair(ctx, block_step(), block_step(fn=compiled)),
                    f"first call (compilation) {compile_s:.1f} s")
    else:
        rows.append(["torch.compile", workload, "skipped", "", "",
                     "pass --compile (off by default: on a CPU, minutes of compilation dominate)"])


def _switch_optim(ctx: Context, rows: Rows) -> None:
    """AdamW for-loop / foreach / fused / as usp builds it, and the EMA update, over the ViT-S/2 MAE's parameters."""
    from usp.models import create_model
    from usp.train.engine import update_ema
    from usp.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = create_model("vit_s_2", latent_size=LATENT["side"], in_channels=LATENT["channels"]).to(ctx.device)
    ema = create_model("vit_s_2", latent_size=LATENT["side"], in_channels=LATENT["channels"]).to(ctx.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3 if p.requires_grad else None

    def adamw(**kwargs: bool) -> Callable[[], None]:
        groups = [{k: v for k, v in g.items() if k != "lr_scale"} for g in param_groups(model, 0.05)]
        return torch.optim.AdamW(groups, lr=1e-4, **kwargs).step

    usp_opt = build_optimizer("adamw", param_groups(model, 0.05), lr=1e-4)
    fused, foreach = usp_opt.defaults.get("fused"), usp_opt.defaults.get("foreach")
    default = "foreach" if ctx.cuda else "for-loop"  # torch picks foreach only for CUDA tensors
    usp_kind = "fused" if fused else "foreach" if foreach else f"torch's default ({default} on {ctx.device.type})"
    params = f"AdamW step, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params (MAE vit_s_2)"
    t = measure({"loop": adamw(foreach=False), "foreach": adamw(foreach=True), "fused": adamw(fused=True),
                 "usp": usp_opt.step}, ctx.device, ctx.sizes.warmup, ctx.sizes.iters, SWITCH_MIN_SECONDS)
    _switch_row(rows, "AdamW: for-loop → foreach", params, t["loop"], t["foreach"])
    _switch_row(rows, f"AdamW: for-loop → fused ({ctx.device.type} kernel)", params, t["loop"], t["fused"])
    _switch_row(rows, "AdamW: for-loop → usp's build_optimizer", params, t["loop"], t["usp"], f"usp picks {usp_kind}")
    if not ctx.cuda:
        rows.append(["AdamW fused (cuda)", params, NOT_MEASURED_GPU, "", "", ""])

    def ema_loop() -> None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1e-4)

    _switch_row(rows, "EMA: per-parameter loop → update_ema (foreach lerp)", params.replace("AdamW step", "EMA update"),
                *_pair(ctx, ema_loop, lambda: update_ema(ema, model, 0.9999)))


def _switch_vae(ctx: Context, rows: Rows) -> None:
    side, batch = ctx.sizes.channels_last_px, ctx.sizes.vae_batch
    space = sd_vae_space().to(ctx.device)
    space_cl = sd_vae_space().to(ctx.device).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1
    images_cl = images.contiguous(memory_format=torch.channels_last)
    _switch_row(rows, "channels-last VAE encode", f"SD-VAE-sized encoder, {batch}×{side} px",
                *_pair(ctx, lambda: space.encode(images), lambda: space_cl.encode(images_cl)))


def _switch_copy(ctx: Context, rows: Rows) -> None:
    batch = torch.randn(ctx.sizes.cache_batch, 2, 2 * LATENT["channels"], LATENT["side"], LATENT["side"])
    workload = f"host→GPU copy of {ctx.sizes.cache_batch} cached moments ({mib(batch.numel() * 4)} MiB)"
    if not ctx.cuda:
        rows.append(["pinned memory + non_blocking (cuda)", workload, NOT_MEASURED_GPU, "", "", ""])
        return
    pinned = batch.pin_memory()
    _switch_row(rows, "pinned memory + non_blocking", workload,
                *_pair(ctx, lambda: batch.to(ctx.device), lambda: pinned.to(ctx.device, non_blocking=True)))


def bench_switches(ctx: Context) -> str:
    """Each fast path measured off and on, in one table."""
    rows: Rows = []
    for part in (_switch_block, _switch_optim, _switch_vae, _switch_copy):
        part(ctx, rows)
        gc.collect()
    notes = [
        "ratio = time with the switch on ÷ time with it off, both timed in this run (< 1: the switch helps).",
        f"{_timing_note(ctx, 'iterations')} Cheap rows get extra rounds (up to {4 * ctx.sizes.iters}) until "
        f"{2 * SWITCH_MIN_SECONDS:.0f} s of timed calls.",
    ]
    header = ["switch (off → on)", "workload", "off ms", "on ms", "ratio", "note"]
    return table("Fast-path switches", header, rows, notes)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


WORKLOADS: dict[str, Callable[[Context], str]] = {
    "pretrain": bench_pretrain,
    "finetune": bench_finetune,
    "sampling": bench_sampling,
    "data": bench_data,
    "metrics": bench_metrics,
    "switches": bench_switches,
}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time usp's training steps, samplers, data path and metrics against baselines; prints one "
                    "markdown table per workload.",
        epilog="examples:\n  python benchmarks/run.py --quick                      # the CPU suite (a few minutes)\n"
               "  python benchmarks/run.py --quick --only metrics --out metrics.md\n"
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
    ctx = Context(device=device, sizes=sizes, amp=amp, compile=args.compile, peaks={})
    torch.manual_seed(0)

    head = [f"## benchmarks/run.py{' --quick' if args.quick else ''}{' --paper-sizes' if args.paper_sizes else ''}", "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} threads "
            f"(torch.get_num_threads() = {torch.get_num_threads()}), {torch.get_num_interop_threads()} interop",
            f"- device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}; precision: "
            f"{'fp32' if amp is None else amp}" + ("; TF32 matmuls on (as usp trains)" if cuda else "")]
    peak_name, peak = peak_for(ctx)
    head.append(f"- measured peak: {fmt(peak / (1e12 if cuda else 1e9))} {'TFLOP/s' if cuda else 'GFLOP/s'} "
                f"({peak_name} {sizes.matmul_n}² matmul)")
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

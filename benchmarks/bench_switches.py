"""Fast-path switches, each measured off and on in one table."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
from bench_common import (
    LATENT,
    NOT_MEASURED_GPU,
    SWITCH_MIN_SECONDS,
    Context,
    Rows,
    cpu_has_bf16,
    measure,
    mib,
    pair,
    switch_row,
    table,
    timing_note,
)
from bench_data import sd_vae_space


def _switch_block(ctx: Context, rows: Rows) -> None:
    """Attention kernel, bf16 autocast and torch.compile on one block of the MAE decoder's shape."""
    import baselines as naive

    from usp.models.vit import Block
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
    switch_row(rows, "attention: explicit softmax → F.scaled_dot_product_attention (usp)", workload,
                *pair(ctx, block_step(explicit=True), block_step()))
    if ctx.cuda or cpu_has_bf16():
        switch_row(rows, f"bf16 autocast ({dev.type})", workload,
                    *pair(ctx, block_step(), block_step(dtype=torch.bfloat16)))
    else:  # emulated bf16 is an order of magnitude slower: one sample keeps the row cheap
        one = x[:1]
        switch_row(rows, "bf16 autocast (cpu)", workload.replace(f"{ctx.sizes.block_batch}×", "1×"),
                    *pair(ctx, block_step(inputs=one), block_step(dtype=torch.bfloat16, inputs=one)),
                    "this CPU has no native bf16 (no AVX512-BF16 / AMX): emulated")
    if not ctx.cuda:
        rows.append(["bf16 autocast (cuda)", workload, NOT_MEASURED_GPU, "", "", ""])
    if ctx.compile:
        compiled = torch.compile(block)
        start = time.perf_counter()
        block_step(fn=compiled)()
        compile_s = time.perf_counter() - start
        switch_row(rows, "torch.compile", workload, *pair(ctx, block_step(), block_step(fn=compiled)),
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
    switch_row(rows, "AdamW: for-loop → foreach", params, t["loop"], t["foreach"])
    switch_row(rows, f"AdamW: for-loop → fused ({ctx.device.type} kernel)", params, t["loop"], t["fused"])
    switch_row(rows, "AdamW: for-loop → usp's build_optimizer", params, t["loop"], t["usp"], f"usp picks {usp_kind}")
    if not ctx.cuda:
        rows.append(["AdamW fused (cuda)", params, NOT_MEASURED_GPU, "", "", ""])

    def ema_loop() -> None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1e-4)

    switch_row(rows, "EMA: per-parameter loop → update_ema (foreach lerp)", params.replace("AdamW step", "EMA update"),
                *pair(ctx, ema_loop, lambda: update_ema(ema, model, 0.9999)))


def _switch_vae(ctx: Context, rows: Rows) -> None:
    side, batch = ctx.sizes.channels_last_px, ctx.sizes.vae_batch
    space = sd_vae_space().to(ctx.device)
    space_cl = sd_vae_space().to(ctx.device).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1
    images_cl = images.contiguous(memory_format=torch.channels_last)
    switch_row(rows, "channels-last VAE encode", f"SD-VAE-sized encoder, {batch}×{side} px",
                *pair(ctx, lambda: space.encode(images), lambda: space_cl.encode(images_cl)))


def _switch_copy(ctx: Context, rows: Rows) -> None:
    batch = torch.randn(ctx.sizes.cache_batch, 2, 2 * LATENT["channels"], LATENT["side"], LATENT["side"])
    workload = f"host→GPU copy of {ctx.sizes.cache_batch} cached moments ({mib(batch.numel() * 4)} MiB)"
    if not ctx.cuda:
        rows.append(["pinned memory + non_blocking (cuda)", workload, NOT_MEASURED_GPU, "", "", ""])
        return
    pinned = batch.pin_memory()
    switch_row(rows, "pinned memory + non_blocking", workload,
                *pair(ctx, lambda: batch.to(ctx.device), lambda: pinned.to(ctx.device, non_blocking=True)))


def bench_switches(ctx: Context) -> str:
    """Each fast path measured off and on, in one table."""
    rows: Rows = []
    for part in (_switch_block, _switch_optim, _switch_vae, _switch_copy):
        part(ctx, rows)
        gc.collect()
    notes = [
        "ratio = time with the switch on ÷ time with it off, both timed in this run (< 1: the switch helps).",
        f"{timing_note(ctx, 'iterations')} Cheap rows get extra rounds (up to {4 * ctx.sizes.iters}) until "
        f"{2 * SWITCH_MIN_SECONDS:.0f} s of timed calls.",
    ]
    header = ["switch (off → on)", "workload", "off ms", "on ms", "ratio", "note"]
    return table("Fast-path switches", header, rows, notes)



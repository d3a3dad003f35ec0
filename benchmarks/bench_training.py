"""Training-step tables: usp's MAE pretraining and DiT/SiT fine-tuning steps against the official code.

With `--official-usp/--official-dit/--official-sit` (see official.py) the official model is built with usp's
weights (strict state-dict load), both losses are computed in fp32 from the same inputs and asserted equal, and
the two steps are timed interleaved. Each side steps with its own code's optimizer set-up:

- MAE: the official `main_pretrain.py` builds torch's AdamW over timm's `param_groups_weight_decay` (cls and
  mask tokens decayed), betas (0.9, 0.95); usp uses `build_optimizer` over `param_groups(official=True)`, the
  recipe switch `optim.official_param_groups` that reproduces those groups exactly.
- DiT / SiT: the official `train.py` builds `AdamW(model.parameters(), lr=1e-4, weight_decay=0)`; usp uses
  `build_optimizer` over `param_groups(model, 0.0)`, the same update.

Random draws happen inside each step in the order the official code draws them (masking noise; DiT's
timesteps then noise; SiT's noise then times; label dropout last) after one reseed, so both sides see the same
numbers. Without a checkout the table has usp's rows only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_common import (
    BATCH_CANDIDATES,
    LATENT,
    MASK_RATIO,
    TRAIN_HEADER,
    TRAIN_NOTES,
    Context,
    check_losses,
    fit_batch,
    measure,
    randomise_zero_init,
    table,
    timing_note,
    train_step,
    training_rows,
)


def _latents(ctx: Context, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(b)
    x = torch.randn(b, LATENT["channels"], LATENT["side"], LATENT["side"], generator=gen)
    return x.to(ctx.device), torch.randint(0, 1000, (b,), generator=gen).to(ctx.device)


def _pretrain_rows(ctx: Context, name: str, batch: int | None) -> list[list[str]]:
    from official import official_mae

    from usp.models import create_model
    from usp.train.flops import training_flops_per_sample
    from usp.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model = create_model(name, latent_size=LATENT["side"], in_channels=LATENT["channels"]).to(ctx.device)
    official = ctx.official.get("usp")
    ref = official_mae(official, model).to(ctx.device) if official else None  # before any step: same weights

    def usp_loss(x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape[0], model.num_patches, device=x.device)  # as the official masking draws it
        return model(x, MASK_RATIO, noise=noise)[0]

    losses = {}
    if ref is not None:
        x1 = _latents(ctx, 1)[0]
        loss, delta = check_losses(lambda: usp_loss(x1), lambda: ref(x1, MASK_RATIO)[0])
        losses = {"usp": (loss, delta), "official": (loss, delta)}

    def steps(b: int) -> dict[str, Callable[[], torch.Tensor]]:
        from timm.optim import param_groups_weight_decay

        x = _latents(ctx, b)[0]
        out = {}
        if ref is not None:  # main_pretrain.py: AdamW(param_groups_weight_decay(model, wd), betas=(0.9, 0.95))
            opt = torch.optim.AdamW(param_groups_weight_decay(ref, 0.05), lr=1e-4, betas=(0.9, 0.95))
            out["official"] = train_step(lambda: ref(x, MASK_RATIO)[0], opt, ctx)
        opt = build_optimizer("adamw", param_groups(model, 0.05, official=True), lr=1e-4, betas=(0.9, 0.95))
        out["usp"] = train_step(lambda: usp_loss(x), opt, ctx)
        return out

    batch = batch or fit_batch(steps, BATCH_CANDIDATES)
    timings = measure(steps(batch), ctx.device, ctx.sizes.warmup, ctx.sizes.iters)
    return training_rows(ctx, f"MAE {name}", batch, training_flops_per_sample(model, MASK_RATIO), timings, losses)


def bench_pretrain(ctx: Context) -> str:
    """MAE pretraining step of usp vs AMAP-ML/USP's models_mae, on 32×32×4 latents with mask ratio 0.75."""
    rows = [row for name, batch in ctx.sizes.pretrain for row in _pretrain_rows(ctx, name, batch)]
    notes = TRAIN_NOTES + [
        f"{'fp32' if ctx.amp is None else f'{ctx.amp} autocast'}; {timing_note(ctx)} Loss checked in fp32 on one "
        "latent before timing (|Δ| ≤ 1e-4 asserted).",
        "official: AMAP-ML/USP pretrain/models_mae.py (timm Block, F.scaled_dot_product_attention), torch AdamW "
        "(for-loop on CPU, torch's default) over timm's groups; usp: fused AdamW over the same groups "
        "(optim.official_param_groups=true).",
    ]
    if "usp" not in ctx.official:
        notes.append("no official checkout given: pass --official-usp PATH (a clone of AMAP-ML/USP) for the ratio.")
    return table("Pretraining step (masked latent modeling, 32×32×4 latents, mask 0.75, AdamW)", TRAIN_HEADER,
                 rows, notes)


def _finetune_rows(ctx: Context, name: str, batch: int | None) -> list[list[str]]:
    from official import official_generator

    from usp.diffusion import create_diffusion, create_transport
    from usp.models import create_model
    from usp.train.flops import training_flops_per_sample
    from usp.train.optim import build_optimizer, param_groups

    sit = name.startswith("sit")
    torch.manual_seed(0)
    model = randomise_zero_init(create_model(name, input_size=LATENT["side"])).to(ctx.device)
    official = ctx.official.get("sit" if sit else "dit")
    ref = official_generator(official, model, "sit" if sit else "dit").to(ctx.device) if official else None
    if sit:
        transport = create_transport()
        ref_transport = official.transport.create_transport("Linear", "velocity") if official else None
    else:
        diffusion = create_diffusion(None)
        ref_diffusion = official.diffusion.create_diffusion(timestep_respacing="") if official else None

    def usp_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if sit:  # SiT's Transport.sample: x0 = randn_like(x1), then t = rand(N) on the CPU
            x0 = torch.randn_like(x)
            t = torch.rand(x.shape[0]).to(x)
            return transport.training_losses(lambda a, s: model(a, s, y), x, noise=x0, t=t)["loss"].mean()
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)  # DiT's train.py, then randn_like inside
        noise = torch.randn_like(x)
        return diffusion.training_losses(lambda a, s: model(a, s, y), x, t, noise)["loss"].mean()

    def ref_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if sit:
            return ref_transport.training_losses(ref, x, dict(y=y))["loss"].mean()
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        return ref_diffusion.training_losses(ref, x, t, dict(y=y))["loss"].mean()

    losses = {}
    if ref is not None:
        one = _latents(ctx, 1)
        loss, delta = check_losses(lambda: usp_loss(*one), lambda: ref_loss(*one))
        losses = {"usp": (loss, delta), "official": (loss, delta)}

    def steps(b: int) -> dict[str, Callable[[], torch.Tensor]]:
        inputs = _latents(ctx, b)
        out = {}
        if ref is not None:  # DiT/SiT train.py: AdamW(model.parameters(), lr=1e-4, weight_decay=0)
            opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0)
            out["official"] = train_step(lambda: ref_loss(*inputs), opt, ctx)
        opt = build_optimizer("adamw", param_groups(model, 0.0), lr=1e-4)
        out["usp"] = train_step(lambda: usp_loss(*inputs), opt, ctx)
        return out

    batch = batch or fit_batch(steps, BATCH_CANDIDATES)
    timings = measure(steps(batch), ctx.device, ctx.sizes.warmup, ctx.sizes.iters)
    label = f"{'SiT' if sit else 'DiT'} {name} ({'linear velocity' if sit else 'DDPM hybrid'})"
    return training_rows(ctx, label, batch, training_flops_per_sample(model), timings, losses)


def bench_finetune(ctx: Context) -> str:
    """DiT (DDPM hybrid loss) / SiT (linear velocity) training step of usp vs the official DiT / SiT code."""
    rows = [row for name, batch in ctx.sizes.finetune for row in _finetune_rows(ctx, name, batch)]
    notes = TRAIN_NOTES + [
        f"{'fp32' if ctx.amp is None else f'{ctx.amp} autocast'}; {timing_note(ctx)} Loss (DiT: learned-sigma "
        "hybrid loss; SiT: velocity MSE) checked in fp32 on one latent before timing.",
        "zero-initialised adaLN and output layers redrawn from N(0, 0.02²) so that every block takes part (as after "
        "transfer from USP weights); label dropout 0.1 draws the same labels in both.",
    ]
    for kind, flag, repo in (("dit", "--official-dit", "facebookresearch/DiT"), ("sit", "--official-sit",
                                                                                 "willisma/SiT")):
        if kind not in ctx.official:
            notes.append(f"no {repo} checkout given: pass {flag} PATH for its ratio.")
    return table("Generator training step (32×32×4 latents, AdamW)", TRAIN_HEADER, rows, notes)

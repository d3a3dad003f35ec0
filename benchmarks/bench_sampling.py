"""Sampling table: usp's DDPM and SiT SDE/ODE samplers with classifier-free guidance, against the official
samplers (DiT's `p_sample_loop`, SiT's `Sampler.sample_sde` / `sample_ode`) on the same weights.

Both sides guide the first 3 of 4 latent channels at scale 4.0 (the official `forward_with_cfg`); the official
samplers carry the doubled CFG batch through every step, as their `sample.py` does, while usp's
`guided_model_fn` doubles it inside the model call only. Noise comes from the global generator on both sides
(no per-sample seeds), and rounds are interleaved (official, usp, official, …).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from bench_common import LATENT, Context, Timing, fmt, pair_ratios, randomise_zero_init, ratio_cell, sync, table

CFG_SCALE = 4.0


class NetworkClock:
    """Accumulates the time spent inside a model's forward, by wrapping the forward of this (bench-local) instance;
    forward_with_cfg calls self.forward, so guided calls are timed too."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.seconds, self.calls = 0.0, 0
        inner = model.forward

        def forward(*args: object, **kwargs: object) -> torch.Tensor:
            sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        model.forward = forward

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _official_samplers(ctx: Context, dit: nn.Module, sit: nn.Module, noise: torch.Tensor, labels: torch.Tensor,
                       steps: int) -> dict[str, Callable[[], object]]:
    """The official sample.py calls, on official models holding usp's weights."""
    from official import official_generator

    out: dict[str, Callable[[], object]] = {}
    z2 = torch.cat([noise, noise])
    if "dit" in ctx.official:
        odit = ctx.official["dit"]
        ref = official_generator(odit, dit, "dit").to(ctx.device).eval()
        y2 = torch.cat([labels, torch.full_like(labels, 1000)])
        diffusion = odit.diffusion.create_diffusion(str(steps))
        out["ddpm"] = lambda: diffusion.p_sample_loop(ref.forward_with_cfg, z2.shape, z2, clip_denoised=False,
                                                     model_kwargs=dict(y=y2, cfg_scale=CFG_SCALE), progress=False,
                                                     device=ctx.device)
    if "sit" in ctx.official:
        osit = ctx.official["sit"]
        ref_sit = official_generator(osit, sit, "sit").to(ctx.device).eval()
        y2 = torch.cat([labels, torch.full_like(labels, 1000)])
        sampler = osit.transport.Sampler(osit.transport.create_transport("Linear", "velocity"))
        sde = sampler.sample_sde(sampling_method="Euler", diffusion_form="sigma", last_step="Mean",
                                 last_step_size=0.04, num_steps=steps)
        ode = sampler.sample_ode(sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3)
        kwargs = dict(y=y2, cfg_scale=CFG_SCALE)
        out["sde"] = lambda: sde(z2, ref_sit.forward_with_cfg, **kwargs)[-1]
        out["ode"] = lambda: ode(z2, ref_sit.forward_with_cfg, **kwargs)[-1]
    return out


def bench_sampling(ctx: Context) -> str:
    """Images/s of usp's guided samplers against the official ones, and usp's time outside the network."""
    from usp.diffusion import create_diffusion, create_transport, p_sample_loop, sample_ode, sample_sde
    from usp.models import create_model
    from usp.sample.guided import guided_model_fn

    s = ctx.sizes
    steps = 50 if s.sample_batch <= 4 and not ctx.cuda else 250  # CPU: 50 steps keep a round under a minute
    torch.manual_seed(0)
    dit_name, sit_name = s.samplers
    dit = randomise_zero_init(create_model(dit_name, input_size=LATENT["side"])).to(ctx.device).eval()
    sit = randomise_zero_init(create_model(sit_name, input_size=LATENT["side"])).to(ctx.device).eval()
    b = s.sample_batch
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(b, LATENT["channels"], LATENT["side"], LATENT["side"], generator=gen).to(ctx.device)
    labels = torch.randint(0, 1000, (b,), generator=gen).to(ctx.device)
    official = _official_samplers(ctx, dit, sit, noise, labels, steps)  # built before the clocks wrap forward
    clocks = {"ddpm": NetworkClock(dit, ctx.device), "sde": NetworkClock(sit, ctx.device)}
    clocks["ode"] = clocks["sde"]
    dit_fn = guided_model_fn(dit, labels, CFG_SCALE, 3)
    sit_fn = guided_model_fn(sit, labels, CFG_SCALE, 3)
    transport, diffusion = create_transport(), create_diffusion(str(steps))
    usp: dict[str, Callable[[], object]] = {
        "ddpm": lambda: p_sample_loop(diffusion, dit_fn, noise),
        "sde": lambda: sample_sde(transport, sit_fn, noise, diffusion_form="sigma", num_steps=steps)[0],
        "ode": lambda: sample_ode(transport, sit_fn, noise)[0],
    }
    names = {"ddpm": (f"DDPM-{steps}, CFG {CFG_SCALE}", dit_name),
             "sde": (f"SiT SDE Euler-{steps} (sigma, last step Mean), CFG {CFG_SCALE}", sit_name),
             "ode": (f"SiT ODE dopri5 (atol 1e-6, rtol 1e-3), CFG {CFG_SCALE}", sit_name)}
    rows = []
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
        for key, fn in usp.items():
            fns = {"official": official[key]} if key in official else {}
            fns["usp"] = fn
            times: dict[str, list[float]] = {k: [] for k in fns}
            inside: list[float] = []
            for name in fns:  # warm-up round
                fns[name]()
            for _ in range(s.sample_iters):
                for name, f in fns.items():
                    clocks[key].reset()
                    sync(ctx.device)
                    start = time.perf_counter()
                    f()
                    sync(ctx.device)
                    times[name].append(time.perf_counter() - start)
                    if name == "usp":
                        inside.append(clocks[key].seconds)
            label, model_name = names[key]
            usp_s = statistics.median(times["usp"])
            row = [label, model_name, str(b), fmt(b / usp_s), fmt(usp_s)]
            if "official" in times:
                off_s = statistics.median(times["official"])
                ratios = pair_ratios(Timing(times["usp"], None, None), Timing(times["official"], None, None))
                row += [fmt(off_s), ratio_cell(ratios)]
            else:
                row += ["not given", "n/a"]
            row.append(fmt(usp_s / statistics.median(inside)))
            rows.append(row)
    notes = [
        "usp ÷ official: wall time per batch, per interleaved round; median [min – max] (target ≤ 1.0).",
        "wall ÷ network: usp's sampler wall time over the time inside the network's forward in the same run "
        "(the excess is the sampler's own work: schedule look-ups, noise, solver state, CFG mixing).",
        f"random weights (zero-initialised layers redrawn from N(0, 0.02²)); dopri5's NFE depends on the weights. "
        f"{s.sample_iters} timed rounds after a warm-up round.",
    ]
    if not official:
        notes.append("no official checkout given: pass --official-dit PATH and --official-sit PATH for the ratios.")
    header = ["sampler", "model", "batch", "usp images/s", "usp s per batch", "official s per batch",
              "usp ÷ official [min – max]", "usp wall ÷ network"]
    return table(f"Guided sampling (32×32×4 latents, {'fp32' if ctx.amp is None else ctx.amp})", header, rows, notes)

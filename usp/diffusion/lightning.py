"""LightningDiT's transport options (hustvl/LightningDiT transport/), each usable by any transport model (SiT too).

All in SiT time (t = 0 noise, t = 1 data; docs/conventions.md), as LightningDiT's transport package, which is SiT's:
- logit-normal training times: t = sigmoid(n), n ~ N(0, 1), scaled into [t0, t1] (`use_lognorm`, after SD3). Its
  density is symmetric about t = 0.5, so it is the same distribution in REPA's reversed time;
- the cosine velocity loss: per pixel, 1 − cos(v_θ, u_t) over the channel dimension, averaged over pixels
  (`use_cosine_loss`: `mean_flat(1 − cosine_similarity(output, target, dim=1))`), added to the MSE with weight 1;
- the shifted ODE grid: t ↦ s·t / (1 + (s − 1)·t) on the sampler's grid (`timestep_shift`, from FLUX), applied when
  s > 0; s < 1 crowds the steps near t = 0 (noise): LightningDiT samples with s = 0.3.
Guidance on the first k channels with an interval start is `guided_channels` and `guidance_interval` (usp.sample):
LightningDiT guides iff t ≥ start, i.e. noise level 1 − t ≤ 1 − start, interval [0, 1 − start].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

T_SAMPLINGS = ("uniform", "logit_normal")
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, as LightningDiT calls it


def sample_t(t0: float, t1: float, how: str = "uniform", generator: torch.Generator | None = None,
             shape: tuple[int, ...] = ()) -> Tensor:
    """Training times in [t0, t1]: uniform, or sigmoid(N(0, 1)) scaled into [t0, t1] (LightningDiT's lognorm)."""
    if how == "uniform":
        u = torch.rand(shape, generator=generator)
    elif how == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator))
    else:
        raise ValueError(f"generation.t_sampling must be one of {', '.join(T_SAMPLINGS)}, got {how!r}")
    return t0 + (t1 - t0) * u


def cosine_velocity_loss(output: Tensor, target: Tensor) -> Tensor:
    """output, target: (N, C, H, W) -> (N,): mean over pixels of 1 − cos(output[:, :, h, w], target[:, :, h, w])."""
    cos = F.cosine_similarity(output.float(), target.float(), dim=1, eps=COSINE_EPS)  # (N, H, W)
    return (1 - cos).flatten(1).mean(dim=1)


def shift_grid(t: Tensor, shift: float) -> Tensor:
    """t ↦ shift·t / (1 + (shift − 1)·t) for shift > 0 (ends 0 and 1 stay); shift ≤ 0 leaves t as it is."""
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)

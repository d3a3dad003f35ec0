"""Diffusion (DDPM, as DiT) and transport (interpolants, as SiT) objectives and samplers, and the one objective
interface built from a recipe (`build_objective`, objective.py) that training, sampling, guidance and probes use.

Time conventions differ between the two and are stated in `docs/conventions.md`.
May import: torch, numpy, torchdiffeq; nothing else of usp (a model is any callable, a recipe any object with
the fields of `generation`).
"""

from usp.diffusion.gaussian import GaussianDiffusion, create_diffusion, ddim_sample_loop, p_sample_loop
from usp.diffusion.objective import DDPM_TIMESTEPS, OBJECTIVES, Objective, build_objective, ode_grid_steps
from usp.diffusion.transport import Transport, create_transport, sample_ode, sample_sde

__all__ = [
    "DDPM_TIMESTEPS",
    "GaussianDiffusion",
    "OBJECTIVES",
    "Objective",
    "Transport",
    "build_objective",
    "create_diffusion",
    "create_transport",
    "ddim_sample_loop",
    "ode_grid_steps",
    "p_sample_loop",
    "sample_ode",
    "sample_sde",
]

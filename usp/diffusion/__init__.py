"""Diffusion (DDPM, as DiT) and transport (interpolants, as SiT) objectives and samplers.

Time conventions differ between the two and are stated in `docs/conventions.md`.
May import: torch, numpy, torchdiffeq; nothing else of usp (a model is any callable).
"""

from usp.diffusion.gaussian import GaussianDiffusion, create_diffusion, ddim_sample_loop, p_sample_loop
from usp.diffusion.transport import Transport, create_transport, sample_ode, sample_sde

__all__ = [
    "GaussianDiffusion",
    "Transport",
    "create_diffusion",
    "create_transport",
    "ddim_sample_loop",
    "p_sample_loop",
    "sample_ode",
    "sample_sde",
]

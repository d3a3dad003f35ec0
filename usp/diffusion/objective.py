"""One objective interface, built from the recipe's `generation` section: DDPM (DiT) or transport (SiT).

Everything outside this folder that trains, samples, guides or probes a generator goes through an `Objective`
and never asks which one it holds:

    sample_t()                       one training time, drawn from the global generator (the engine seeds it
                                     per sample, so a resumed run draws the same times)
    training_losses(model_fn, x, t, noise) -> {"loss": (N,), ...}
    noise_level(t) -> (N,) float64   the sampler's time -> noise level (1 = pure noise, 0 = data): what a
                                     guidance interval is written in
    model_time(level) -> float       a noise level -> the model's time (the backbone probe)
    noised(x, noise, level) -> (x_t, t)   clean latents moved to a noise level along the objective's process
    sample(model_fn, noise, generator, progress) -> x   the recipe's sampler, from x_T / x_0 noise to data

Each objective's time convention is stated in `docs/conventions.md`. The two adapters below only translate
the recipe into calls of `gaussian.py` and `transport.py`; the numerics live there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from usp.diffusion.gaussian import Generators, create_diffusion, ddim_sample_loop, p_sample_loop
from usp.diffusion.lightning import sample_t
from usp.diffusion.transport import FIXED_GRID_METHODS, create_transport, sample_ode, sample_sde

ModelFn = Callable[[Tensor, Tensor], Tensor]

# DiT's training diffusion has T = 1000 steps (DDPM §4); a respaced sampler hands the model these original steps.
DDPM_TIMESTEPS = 1000


class Objective(Protocol):
    name: str

    def sample_t(self) -> Tensor: ...
    def training_losses(self, model_fn: ModelFn, x: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]: ...
    def noise_level(self, t: Tensor) -> Tensor: ...
    def model_time(self, level: float) -> float: ...
    def noised(self, x: Tensor, noise: Tensor, level: float) -> tuple[Tensor, Tensor]: ...
    def sample(self, model_fn: ModelFn, noise: Tensor, generator: Generators = None,
               progress: bool = False) -> Tensor: ...


def _check_level(level: float) -> None:
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"noise level must lie in [0, 1] (0 = data, 1 = noise), got {level}")


class DDPMObjective:
    """DiT's DDPM: integer time t ∈ {0, …, T−1}, t = 0 is (almost) data. Trains on all T steps; samples with
    the respacing `sample_steps` names ("250", "ddim50"), by ancestral DDPM or by DDIM."""

    name = "ddpm"
    samplers = {"ddpm": p_sample_loop, "ddim": ddim_sample_loop}

    def __init__(self, gen: Any):
        if gen.sampler not in self.samplers:
            raise ValueError(f"generation.sampler={gen.sampler} is not a DDPM sampler; use one of "
                             f"{', '.join(self.samplers)}")
        self.sampler = gen.sampler
        self.diffusion = create_diffusion(None, learn_sigma=gen.learn_sigma, num_timesteps=DDPM_TIMESTEPS)
        self.respaced = create_diffusion(gen.sample_steps, learn_sigma=gen.learn_sigma, num_timesteps=DDPM_TIMESTEPS)

    def sample_t(self) -> Tensor:
        return torch.randint(0, self.diffusion.num_timesteps, ())

    def training_losses(self, model_fn: ModelFn, x: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        return self.diffusion.training_losses(model_fn, x, t=t, noise=noise)

    def noise_level(self, t: Tensor) -> Tensor:
        # float64, so that e.g. timestep 700 gives exactly the float 0.7 an interval bound is written as
        return t.to(torch.float64) / DDPM_TIMESTEPS

    def model_time(self, level: float) -> float:
        _check_level(level)
        return float(round(level * (DDPM_TIMESTEPS - 1)))

    def noised(self, x: Tensor, noise: Tensor, level: float) -> tuple[Tensor, Tensor]:
        t = torch.full((len(x),), int(self.model_time(level)), dtype=torch.long, device=x.device)
        return self.diffusion.q_sample(x, t, noise), t

    def sample(self, model_fn: ModelFn, noise: Tensor, generator: Generators = None,
               progress: bool = False) -> Tensor:
        return self.samplers[self.sampler](self.respaced, model_fn, noise, progress=progress, generator=generator)


class TransportObjective:
    """SiT's transport: time t ∈ [0, 1], t = 0 is noise, t = 1 is data. Trains with t in the transport's interval
    [t0, t1], uniform (SiT) or logit-normal (LightningDiT, `t_sampling`), with the cosine velocity term if
    `cosine_loss`; samples by the probability-flow ODE (its grid shifted by `timestep_shift`) or the SDE. A network
    trained in REPA's time is wrapped by the caller (`usp.diffusion.time.in_sit_time`): this speaks SiT time."""

    name = "transport"
    samplers = ("ode", "sde")

    def __init__(self, gen: Any):
        if gen.sampler not in self.samplers:
            raise ValueError(f"generation.sampler={gen.sampler} is not a transport sampler; use one of "
                             f"{', '.join(self.samplers)}")
        self.gen = gen
        self.transport = create_transport(gen.path, gen.prediction, gen.loss_weight, gen.train_eps, gen.sample_eps,
                                          cosine_loss=gen.cosine_loss)

    def sample_t(self) -> Tensor:
        return sample_t(*self.transport.interval(), self.gen.t_sampling)

    def training_losses(self, model_fn: ModelFn, x: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        return self.transport.training_losses(model_fn, x, t=t, noise=noise)

    def noise_level(self, t: Tensor) -> Tensor:
        return 1.0 - t.to(torch.float64)

    def model_time(self, level: float) -> float:
        _check_level(level)
        return 1.0 - level

    def noised(self, x: Tensor, noise: Tensor, level: float) -> tuple[Tensor, Tensor]:
        t = torch.full((len(x),), self.model_time(level), device=x.device)
        return self.transport.path.interpolate(t, noise, x)[0], t

    def sample(self, model_fn: ModelFn, noise: Tensor, generator: Generators = None,
               progress: bool = False) -> Tensor:
        gen = self.gen
        if gen.sampler == "sde":
            return sample_sde(self.transport, model_fn, noise, num_steps=int(gen.sample_steps),
                              generator=generator)[0]
        # sample_ode, as SiT's, counts the grid's points: one more than its steps
        return sample_ode(self.transport, model_fn, noise, method=gen.ode_method, num_steps=ode_grid_steps(gen) + 1,
                          timestep_shift=gen.timestep_shift)[0]


def ode_grid_steps(gen: Any) -> int:
    """The steps of the fixed grid a recipe's ODE sampler walks: `sample_steps` for Euler / Heun (REPA's num_steps;
    SiT's and LightningDiT's "250" is 250 points = 249 steps, so their grids are sample_steps 249 here). An adaptive
    solver (dopri5) picks its own steps; a fixed-grid stand-in for it takes 49."""
    fixed = gen.ode_method in FIXED_GRID_METHODS and gen.sample_steps.isdigit()
    return int(gen.sample_steps) if fixed else 49


OBJECTIVES: dict[str, type] = {"ddpm": DDPMObjective, "transport": TransportObjective}


def build_objective(gen: Any) -> Objective:
    """The objective of a recipe's `generation` section (`usp.config.GenerationConfig`, or anything with its
    fields): `gen.method` picks DDPM or transport, the other fields configure it."""
    if gen.method not in OBJECTIVES:
        raise ValueError(f"generation.method must be one of {', '.join(OBJECTIVES)}, got {gen.method!r}")
    return OBJECTIVES[gen.method](gen)

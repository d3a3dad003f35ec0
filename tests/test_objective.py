"""The objective interface (`usp.diffusion.build_objective`) is a translation of the recipe, not new numerics:
through it, training losses, training times, noised inputs and samples are bitwise those of calling DDPM
(gaussian.py) or transport (transport.py) directly, and the recipe's sampler table agrees with the objectives."""

from __future__ import annotations

import pytest
import torch

from usp.config import SAMPLERS, GenerationConfig
from usp.diffusion import OBJECTIVES, build_objective, create_diffusion, create_transport
from usp.diffusion.gaussian import ddim_sample_loop, p_sample_loop
from usp.diffusion.transport import sample_ode, sample_sde


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in network: depends on x and t, 2C channels (learned sigma) cut to C where needed."""
    out = torch.tanh(x * (1 + t.float().view(-1, 1, 1, 1) / 1000))
    return torch.cat([out, 0.5 * out], dim=1)


def first_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return field(x, t)[:, : x.shape[1]]


def test_the_recipe_s_sampler_table_is_the_objectives():
    assert {method: set(samplers) for method, samplers in SAMPLERS.items()} == \
        {name: set(cls.samplers) for name, cls in OBJECTIVES.items()}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ddpm_through_the_objective_is_gaussian_diffusion(sampler):
    gen = GenerationConfig(method="ddpm", sampler=sampler, sample_steps="ddim5" if sampler == "ddim" else "5")
    objective = build_objective(gen)
    x, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    direct = create_diffusion(None, learn_sigma=True).training_losses(field, x, t=t, noise=noise)
    through = objective.training_losses(field, x, t=t, noise=noise)
    assert direct.keys() == through.keys() and all(torch.equal(direct[k], through[k]) for k in direct)
    torch.manual_seed(7)
    drawn = objective.sample_t()
    torch.manual_seed(7)
    assert drawn.dtype == torch.long and torch.equal(drawn, torch.randint(0, 1000, ()))
    x_t, t_half = objective.noised(x, noise, 0.5)
    assert t_half.tolist() == [500] * 3 and torch.equal(x_t, create_diffusion(None).q_sample(x, t_half, noise))
    loop = {"ddpm": p_sample_loop, "ddim": ddim_sample_loop}[sampler]
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    expected = loop(create_diffusion(gen.sample_steps), field, noise, generator=gens)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    assert torch.equal(objective.sample(field, noise, generator=gens), expected)


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_transport_through_the_objective_is_the_transport(sampler):
    gen = GenerationConfig(method="transport", sampler=sampler, ode_method="heun", sample_steps="5", path="gvp")
    objective = build_objective(gen)
    transport = create_transport("gvp")
    x, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0.0, 0.3, 1.0])
    direct = transport.training_losses(first_half, x, t=t, noise=noise)
    assert torch.equal(objective.training_losses(first_half, x, t=t, noise=noise)["loss"], direct["loss"])
    torch.manual_seed(7)
    drawn = objective.sample_t()
    torch.manual_seed(7)
    t0, t1 = transport.interval()
    assert torch.equal(drawn, t0 + (t1 - t0) * torch.rand(()))
    x_t, t_quarter = objective.noised(x, noise, 0.25)
    assert t_quarter.tolist() == [0.75] * 3 and torch.equal(x_t, transport.path.interpolate(t_quarter, noise, x)[0])
    assert objective.noise_level(torch.tensor([0.0, 0.75])).tolist() == [1.0, 0.25]
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    if sampler == "sde":
        expected = sample_sde(transport, first_half, noise, num_steps=5, generator=gens)[0]
    else:
        expected = sample_ode(transport, first_half, noise, method="heun", num_steps=6)[0]  # 5 steps = 6 grid points
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    assert torch.equal(objective.sample(first_half, noise, generator=gens), expected)


def test_a_sampler_of_the_other_objective_is_refused():
    with pytest.raises(ValueError, match="generation.sampler=ode is not a DDPM sampler"):
        build_objective(GenerationConfig(method="ddpm", sampler="ode"))
    with pytest.raises(ValueError, match="generation.sampler=ddim is not a transport sampler"):
        build_objective(GenerationConfig(method="transport", sampler="ddim"))
    with pytest.raises(ValueError, match="noise level must lie in"):
        build_objective(GenerationConfig()).model_time(1.5)


def test_lightningdit_s_transport_options_reach_the_transport_through_the_objective():
    gen = GenerationConfig(method="transport", sampler="ode", t_sampling="logit_normal", cosine_loss=True)
    objective = build_objective(gen)
    torch.manual_seed(3)
    drawn = objective.sample_t()
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.sigmoid(torch.randn(())))  # linear path, velocity: the interval is [0, 1]
    x, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([0.2, 0.7])
    through = objective.training_losses(first_half, x, t=t, noise=noise)
    direct = create_transport("linear", cosine_loss=True).training_losses(first_half, x, t=t, noise=noise)
    assert set(through) == {"loss", "mse", "cos_loss"} and all(torch.equal(through[k], direct[k]) for k in direct)

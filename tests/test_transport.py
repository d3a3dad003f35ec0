"""Transport (usp.diffusion.transport): path formulas, objectives, and samplers on a Gaussian-to-Gaussian transport.

Data x1 ~ N(m, s²) per dimension, noise x0 ~ N(0, 1), x_t = α x1 + σ x0. Then x_t ~ N(α m, V), V = α² s² + σ²,
E[x1 | x] = m + α s² (x − α m) / V, E[x0 | x] = σ (x − α m) / V, so the exact fields are
    v(x, t) = α̇ m + (α α̇ s² + σ σ̇)(x − α m) / V,   s(x, t) = −(x − α m) / V,   ε(x, t) = σ (x − α m) / V,
and the ODE map is affine: x(t1) = α1 m + sqrt(V1) (x(t0) − α0 m) / sqrt(V0).
(Linear path: v = m + (x − t m)(t s² − (1 − t)) / ((t s)² + (1 − t)²).)
"""

from __future__ import annotations

import math

import pytest
import torch

from usp.diffusion import create_transport, sample_ode, sample_sde
from usp.diffusion.transport import GVPPath, LinearPath, VPPath, diffusion_coefficient

M, S = 2.0, 0.5
N = 4000


def hand_coefficients(path: str, t: float) -> tuple[float, float]:
    if path == "linear":
        return t, 1 - t
    if path == "gvp":
        return math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
    log_alpha = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1  # SiT's VPCPlan
    return math.exp(log_alpha), math.sqrt(1 - math.exp(2 * log_alpha))


def gaussian_fields(transport, kind: str):
    """The exact velocity / score / noise field of the Gaussian-to-Gaussian transport, as a model_fn."""

    def model(x, t):
        alpha, sigma, d_alpha, d_sigma = transport.path.coefficients(t.view(-1, 1, 1, 1))
        var = alpha**2 * S**2 + sigma**2
        centred = x - alpha * M
        if kind == "velocity":
            return d_alpha * M + (alpha * d_alpha * S**2 + sigma * d_sigma) * centred / var
        return -centred / var if kind == "score" else sigma * centred / var

    return model


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(N // 4, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["linear", "gvp", "vp"])
def test_path_coefficients_and_interpolant(name):
    path = create_transport(name).path
    t = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99], dtype=torch.float64, requires_grad=True)
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    for i, ti in enumerate(t.tolist()):
        a, s = hand_coefficients(name, ti)
        assert alpha[i].item() == pytest.approx(a, rel=1e-12) and sigma[i].item() == pytest.approx(s, rel=1e-12)
    # the derivatives are the derivatives
    torch.testing.assert_close(torch.autograd.grad(alpha.sum(), t, retain_graph=True)[0], d_alpha.detach())
    torch.testing.assert_close(torch.autograd.grad(sigma.sum(), t)[0], d_sigma.detach())
    td = t.detach()
    torch.testing.assert_close(path.d_log_alpha(td), (d_alpha / alpha).detach())
    # SBDM diffusion w = (α̇/α) σ² − σ σ̇; the VP closed form β/2 agrees with it
    generic = (d_alpha / alpha * sigma**2 - sigma * d_sigma).detach()
    torch.testing.assert_close(path.drift_var(td), generic)

    x0, x1 = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    x_t, u_t = path.interpolate(td, x0, x1)
    a, s, da, ds = (c.detach().view(-1, 1, 1, 1) for c in (alpha, sigma, d_alpha, d_sigma))
    torch.testing.assert_close(x_t, a * x1 + s * x0)
    torch.testing.assert_close(u_t, da * x1 + ds * x0)
    # conversions: for one pair (x0, x1) the conditional velocity u_t maps to noise x0 and score −x0/σ
    torch.testing.assert_close(path.noise_from_velocity(u_t, x_t, td), x0)
    torch.testing.assert_close(path.score_from_velocity(u_t, x_t, td), -x0 / s)
    torch.testing.assert_close(path.velocity_from_score(-x0 / s, x_t, td), u_t)


def test_linear_formulas_by_hand():
    t = torch.tensor([0.25])
    x0, x1 = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    x_t, u_t = LinearPath().interpolate(t, x0, x1)
    assert x_t.item() == pytest.approx(0.25 * 3 + 0.75 * 1) and u_t.item() == pytest.approx(3 - 1)
    x_t, u_t = GVPPath().interpolate(t, x0, x1)
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    assert x_t.item() == pytest.approx(3 * s + c) and u_t.item() == pytest.approx(math.pi / 2 * (3 * c - s))
    assert VPPath().drift_var(torch.tensor(0.25)).item() == pytest.approx(0.5 * (0.1 + 0.75 * 19.9))


def test_defaults_and_intervals():
    lin = create_transport()
    assert (lin.train_eps, lin.sample_eps) == (0.0, 0.0)
    assert lin.interval() == (0.0, 1.0) and lin.interval(sampling=True) == (0.0, 1.0)
    assert lin.interval(sampling=True, sde=True, last_step_size=0.04) == (0.0, 0.96)
    score = create_transport("Linear", "score")
    assert (score.train_eps, score.sample_eps) == (1e-3, 1e-3)
    assert score.interval() == (1e-3, 1 - 1e-3)
    vp = create_transport("VP")
    assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
    assert vp.interval() == (0.0, 1 - 1e-5) and vp.interval(sampling=True) == (0.0, 1 - 1e-3)
    assert vp.interval(sampling=True, sde=True, diffusion_form="SBDM", last_step_size=0.04) == (0.0, 0.96)
    gvp = create_transport("gvp", sample_eps=1e-2)
    assert gvp.interval(sampling=True, sde=True, diffusion_form="SBDM", last_step_size=0.0) == (1e-2, 1 - 1e-2)
    assert create_transport("vp", train_eps=1e-4).sample_eps == 1e-3  # each eps defaults on its own
    with pytest.raises(ValueError, match="velocity prediction"):
        create_transport(loss_weight="likelihood")
    with pytest.raises(ValueError, match="path must be"):
        create_transport("cosine")


def test_velocity_loss_by_hand_and_t_range():
    transport = create_transport()
    x1, x0 = torch.randn(6, 2, 2, 2), torch.randn(6, 2, 2, 2)
    t = torch.rand(6)
    loss = transport.training_losses(lambda x, t: torch.zeros_like(x), x1, x0, t)["loss"]
    torch.testing.assert_close(loss, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))  # u = x1 − x0 for Linear
    exact = lambda x, t: x1 - x0
    assert transport.training_losses(exact, x1, x0, t)["loss"].abs().max().item() < 1e-12

    seen = []
    record = lambda x, t: (seen.append(t), torch.zeros_like(x))[1]
    create_transport("linear", "score", train_eps=0.1).training_losses(record, torch.randn(512, 1, 1, 1))
    assert seen[0].min().item() >= 0.1 and seen[0].max().item() <= 0.9 and seen[0].std().item() > 0.2


@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_loss_weightings(prediction, weight):
    transport = create_transport("linear", prediction, loss_weight=weight)
    x1, x0 = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.8])
    loss = transport.training_losses(lambda x, t: torch.zeros_like(x), x1, x0, t)["loss"]
    # Linear: w_t = (α̇/α)σ² − σσ̇ = (1 − t)/t, so (w/σ)² = 1/t² and w/σ² = 1/(t(1 − t))
    lam = {None: torch.ones(3), "velocity": 1 / t**2, "likelihood": 1 / (t * (1 - t))}[weight]
    torch.testing.assert_close(loss, lam * (x0**2).mean(dim=(1, 2, 3)))
    sigma = (1 - t).view(-1, 1, 1, 1)
    truth = -x0 / sigma if prediction == "score" else x0
    assert transport.training_losses(lambda x, t: truth, x1, x0, t)["loss"].abs().max().item() < 1e-10


def _affine_target(transport, x0):
    t0, t1 = transport.interval(sampling=True)
    (a0, s0), (a1, s1) = (hand_coefficients(transport.path.name, t) for t in (t0, t1))
    return a1 * M + math.sqrt(a1**2 * S**2 + s1**2) * (x0 - a0 * M) / math.sqrt(a0**2 * S**2 + s0**2)


# (path, prediction, method, num_steps) -> max per-sample error allowed; measured values in the comments
ODE_CASES = [
    ("linear", "velocity", "dopri5", None, 0.08),  # 0.054 max error, 20 NFE
    ("linear", "velocity", "euler", 51, 0.08),  # 0.056, 50 NFE
    ("linear", "velocity", "heun", 51, 2e-3),  # 3e-4, 100 NFE
    ("gvp", "velocity", "dopri5", None, 0.08),
    ("vp", "velocity", "dopri5", None, 0.08),
    ("linear", "score", "dopri5", None, 0.08),
    ("linear", "noise", "heun", 51, 5e-3),
]


@pytest.mark.parametrize(("path", "prediction", "method", "num_steps", "tol"), ODE_CASES)
def test_ode_sampler_reaches_target(path, prediction, method, num_steps, tol):
    transport = create_transport(path, prediction)
    x0 = noise()
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    x, nfe = sample_ode(transport, gaussian_fields(transport, prediction), x0, method=method, **kwargs)
    assert (x - _affine_target(transport, x0)).abs().max().item() < tol
    assert abs(x.mean().item() - M) < 0.05 and abs(x.std().item() - S) < 0.03
    expected_nfe = {"euler": (num_steps or 0) - 1, "heun": 2 * ((num_steps or 0) - 1)}.get(method)
    assert nfe == expected_nfe if expected_nfe is not None else 6 < nfe < 200


def test_dopri5_tightens_with_tolerance():
    transport = create_transport()
    x0 = noise()
    target = _affine_target(transport, x0)
    x, nfe = sample_ode(transport, gaussian_fields(transport, "velocity"), x0, rtol=1e-6)
    assert (x - target).abs().max().item() < 1e-4 and nfe > 20  # measured 4e-6 with 44 NFE


# (path, method, diffusion form, last step); all reach N(M, S²) on N samples
SDE_CASES = [
    ("linear", "euler", "sigma", "Mean"),
    ("linear", "heun", "sigma", "Mean"),
    ("linear", "euler", "constant", "Tweedie"),
    ("linear", "euler", "linear", "Euler"),
    ("linear", "euler", "decreasing", None),
    ("linear", "euler", "increasing-decreasing", "Mean"),
    ("gvp", "euler", "sigma", "Mean"),
    ("vp", "euler", "SBDM", None),
    ("vp", "heun", "SBDM", None),
]


@pytest.mark.parametrize(("path", "method", "form", "last_step"), SDE_CASES)
def test_sde_sampler_reaches_target(path, method, form, last_step):
    transport = create_transport(path)
    x, nfe = sample_sde(transport, gaussian_fields(transport, "velocity"), noise(), method=method,
                        diffusion_form=form, last_step=last_step, num_steps=250,
                        generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - M) < 0.04 and abs(x.std().item() - S) < 0.04
    assert nfe == (249 if method == "euler" else 2 * 249) + (last_step is not None)


def test_mean_last_step_is_a_noise_free_drift_step():
    """VP, SBDM, 'Mean': the SDE stops at t1 = 0.96 where x ~ N(α m, V) with σ_t1 ≈ 0.14 still in it, and the last
    step x + h (v + w s) scales x − α m by 1 + h k, k = (α α̇ s² + σ σ̇ − w) / V: the std lands on that, not on S."""
    transport = create_transport("vp")
    x, _ = sample_sde(transport, gaussian_fields(transport, "velocity"), noise(), diffusion_form="SBDM",
                      generator=torch.Generator().manual_seed(1))
    t1 = torch.tensor(0.96, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (c.item() for c in transport.path.coefficients(t1))
    var, w = alpha**2 * S**2 + sigma**2, 0.5 * (0.1 + 0.04 * 19.9)
    expected = (1 + 0.04 * (alpha * d_alpha * S**2 + sigma * d_sigma - w) / var) * math.sqrt(var)  # 0.455
    assert abs(x.std().item() - expected) < 0.015 and abs(expected - S) > 0.04


def test_sbdm_needs_an_eps_on_linear():
    with pytest.raises(ValueError, match="infinite at t = 0"):
        sample_sde(create_transport(), gaussian_fields(create_transport(), "velocity"), noise(), diffusion_form="SBDM")
    transport = create_transport(sample_eps=1e-3)
    x, _ = sample_sde(transport, gaussian_fields(transport, "velocity"), noise(), diffusion_form="SBDM",
                      generator=torch.Generator().manual_seed(2))
    assert abs(x.mean().item() - M) < 0.04 and abs(x.std().item() - S) < 0.04


def test_diffusion_forms_by_hand():
    t = torch.tensor([0.1, 0.25, 0.5, 0.9])
    path = LinearPath()
    torch.testing.assert_close(diffusion_coefficient(path, t, "increasing-decreasing", 2.0),
                               2.0 * torch.sin(math.pi * t) ** 2)
    torch.testing.assert_close(diffusion_coefficient(path, t, "decreasing", 1.0),
                               0.25 * (torch.cos(math.pi * t) + 1) ** 2)
    torch.testing.assert_close(diffusion_coefficient(path, t, "SBDM", 1.0), (1 - t) / t)
    torch.testing.assert_close(diffusion_coefficient(path, t, "sigma", 0.5), 0.5 * (1 - t))
    with pytest.raises(ValueError, match="diffusion form"):
        diffusion_coefficient(path, t, "inccreasing-decreasing")

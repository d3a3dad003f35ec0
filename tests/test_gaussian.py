"""DDPM (usp.diffusion.gaussian) against formulas computed by hand, and samplers on data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from usp.diffusion import create_diffusion, ddim_sample_loop, p_sample_loop
from usp.diffusion.gaussian import space_timesteps

T = 1000


def hand_betas(num: int = T) -> list[float]:
    """β_s = 1e-4 + (0.02 − 1e-4) s / (T − 1), DDPM's linear schedule, in plain Python floats."""
    return [1e-4 + (0.02 - 1e-4) * s / (num - 1) for s in range(num)]


def hand_alpha_bar(t: int) -> float:
    return math.prod(1 - b for b in hand_betas()[: t + 1])


def test_q_sample_matches_hand_formula():
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    steps = [0, 1, 500, 999]
    x_t = diffusion.q_sample(x0, torch.tensor(steps), eps)
    for i, t in enumerate(steps):
        ab = hand_alpha_bar(t)
        expected = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-6, atol=1e-6)
    assert diffusion.schedule("alphas_cumprod")[999].item() == pytest.approx(hand_alpha_bar(999), rel=1e-10)


def test_posterior_matches_hand_formula():
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    steps = [1, 10, 700]
    mean, var, log_var = diffusion.q_posterior(x0, x_t, torch.tensor(steps))
    betas = hand_betas()
    for i, t in enumerate(steps):
        ab, ab_prev = hand_alpha_bar(t), hand_alpha_bar(t - 1)
        # μ̃_t = sqrt(ᾱ_{t-1}) β_t / (1 − ᾱ_t) x0 + sqrt(α_t) (1 − ᾱ_{t-1}) / (1 − ᾱ_t) x_t
        # β̃_t = (1 − ᾱ_{t-1}) / (1 − ᾱ_t) β_t
        expected_mean = math.sqrt(ab_prev) * betas[t] / (1 - ab) * x0[i] + \
            math.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab) * x_t[i]
        expected_var = (1 - ab_prev) / (1 - ab) * betas[t]
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-5, atol=1e-6)
        assert var[i].flatten()[0].item() == pytest.approx(expected_var, rel=1e-6)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(expected_var), rel=1e-6)
    # β̃_0 = 0: its log is clipped to log β̃_1
    clipped = diffusion.schedule("posterior_log_variance_clipped")
    assert clipped[0].item() == pytest.approx(math.log((1 - hand_alpha_bar(0)) / (1 - hand_alpha_bar(1)) * betas[1]))


def test_respacing_keeps_timesteps_and_alpha_bars():
    assert sorted(space_timesteps(T, "10")) == [111 * k for k in range(10)]
    assert sorted(space_timesteps(T, "ddim50")) == list(range(0, 1000, 20))
    two = sorted(space_timesteps(T, "10,20"))
    assert len(two) == 30 and two[0] == 0 and two[9] == 499 and two[10] == 500 and two[-1] == 999
    with pytest.raises(ValueError, match="exactly 600"):
        space_timesteps(T, "ddim600")  # strides 1 and 2 give 1000 and 500 steps

    diffusion = create_diffusion("10")
    kept = [111 * k for k in range(10)]
    assert diffusion.num_timesteps == 10 and diffusion.timestep_map.tolist() == kept
    base_ab = np.cumprod(1 - np.array(hand_betas()))
    np.testing.assert_allclose(diffusion.schedule("alphas_cumprod").numpy(), base_ab[kept], rtol=1e-12)
    np.testing.assert_allclose(diffusion.schedule("betas")[1].item(), 1 - base_ab[111] / base_ab[0], rtol=1e-12)

    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    diffusion.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 4, 9]))
    assert seen[-1].tolist() == [0, 444, 999]  # the model sees the original timesteps


def _learned_model(eps, v):
    return lambda x, t: torch.cat([eps, v], dim=1)


@pytest.mark.parametrize("t", [5, 500, 999])
def test_vb_is_zero_for_true_posterior_and_matches_gaussian_kl(t):
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ts = torch.full((2,), t)
    # true ε and v = −1 (log variance = log β̃_t): p(x_{t-1}|x_t) is the true posterior
    out = diffusion.training_losses(_learned_model(noise, -torch.ones_like(x0)), x0, ts, noise)
    assert out["vb"].abs().max().item() < 1e-5 and out["mse"].abs().max().item() == 0.0

    # mismatch: ε off by δ, v = +1 (variance β_t). KL(N(μ̃, β̃) ‖ N(μ̃ + Δμ, β)) in bits, by hand.
    delta = 0.1
    out = diffusion.training_losses(_learned_model(noise + delta, torch.ones_like(x0)), x0, ts, noise)
    beta = hand_betas()[t]
    ab, ab_prev = hand_alpha_bar(t), hand_alpha_bar(t - 1)
    var_q = (1 - ab_prev) / (1 - ab) * beta
    d_mu = math.sqrt(ab_prev) * beta / (1 - ab) * (-math.sqrt(1 / ab - 1) * delta)  # coef1 · Δx̂0
    kl = 0.5 * (math.log(beta / var_q) + var_q / beta + d_mu**2 / beta - 1) / math.log(2)
    torch.testing.assert_close(out["vb"], torch.full((2,), kl), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(out["mse"], torch.full((2,), delta**2), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


def test_vb_trains_variance_only():
    diffusion = create_diffusion()
    x0 = torch.randn(2, 3, 4, 4)
    output = torch.randn(2, 6, 4, 4, requires_grad=True)
    diffusion.training_losses(lambda x, t: output, x0, torch.tensor([3, 600]))["vb"].sum().backward()
    assert output.grad[:, :3].abs().max().item() == 0.0  # the mean is frozen in the VB term
    assert output.grad[:, 3:].abs().max().item() > 0.0


def test_decoder_nll_at_t0():
    diffusion = create_diffusion()
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0]).view(1, 5, 1, 1)
    noise = torch.randn_like(x0)
    out = diffusion.training_losses(_learned_model(noise, torch.zeros_like(x0)), x0, torch.tensor([0]), noise)
    # at t = 0 the mean is x0 exactly (true ε); log σ² = ½(log β_0 + log β̃_1)
    betas = hand_betas()
    log_var = 0.5 * (math.log(betas[0]) + math.log((1 - hand_alpha_bar(0)) / (1 - hand_alpha_bar(1)) * betas[1]))
    std = math.exp(0.5 * log_var)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # exact Φ; DiT uses a tanh approximation of it
    nll = []
    for x in x0.flatten().tolist():
        upper = 1.0 if x > 0.999 else phi((1 / 255) / std)
        lower = 0.0 if x < -0.999 else phi((-1 / 255) / std)
        nll.append(-math.log(upper - lower) / math.log(2))
    assert out["vb"].item() == pytest.approx(sum(nll) / len(nll), rel=2e-3)


def test_rescaled_vb_and_fixed_variance():
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([3, 100])
    model = _learned_model(noise + 0.05, torch.zeros_like(x0))
    plain = create_diffusion("250").training_losses(model, x0, t, noise)["vb"]
    rescaled = create_diffusion("250", rescale_vb=True).training_losses(model, x0, t, noise)["vb"]
    torch.testing.assert_close(rescaled, plain * 0.25)

    fixed = create_diffusion(learn_sigma=False)
    out = fixed.training_losses(lambda x, t: noise + 0.2, x0, t, noise)
    assert set(out) == {"loss", "mse"}
    torch.testing.assert_close(out["loss"], torch.full((2,), 0.04))
    p = fixed.p_mean_variance(lambda x, t: noise, x0, t)
    assert p["variance"][1, 0, 0, 0].item() == pytest.approx(hand_betas()[100], rel=1e-6)  # "fixed large": β_t


def _point_mass_eps(c: torch.Tensor, learn_sigma: bool):
    """The exact ε for data x0 ≡ c: ε = (x_t − sqrt(ᾱ_t) c) / sqrt(1 − ᾱ_t), t the original timestep."""
    ab = torch.from_numpy(np.cumprod(1 - np.array(hand_betas()))).float()

    def model(x, t):
        a = ab[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_samplers_land_on_point_mass(learn_sigma):
    c = torch.tensor([0.3, -0.7, 1.2]).view(1, 3, 1, 1)
    noise = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    model = _point_mass_eps(c, learn_sigma)
    g = torch.Generator().manual_seed(4)
    x = p_sample_loop(create_diffusion("50", learn_sigma=learn_sigma), model, noise, generator=g)
    torch.testing.assert_close(x, c.expand_as(x), atol=1e-4, rtol=0)
    x = ddim_sample_loop(create_diffusion("ddim25", learn_sigma=learn_sigma), model, noise)
    torch.testing.assert_close(x, c.expand_as(x), atol=1e-4, rtol=0)


def _gaussian_eps(m: float, s: float, learn_sigma: bool = True):
    """Data x0 ~ N(m, s²) per dimension: E[ε | x_t] = b (x_t − a m) / (a² s² + b²), a = sqrt(ᾱ), b = sqrt(1 − ᾱ)."""
    ab = torch.from_numpy(np.cumprod(1 - np.array(hand_betas()))).float()

    def model(x, t):
        a2 = ab[t].view(-1, 1, 1, 1)
        eps = (1 - a2).sqrt() * (x - a2.sqrt() * m) / (a2 * s**2 + 1 - a2)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model, ab[-1].item()


def test_ddim_converges_to_the_exact_flow_map():
    """DDIM (eta=0) discretises the probability-flow ODE, whose map for Gaussian data is affine:
    x_0 = m + s (x_T − a_T m) / sqrt(a_T² s² + b_T²). Its error is first order in the step."""
    m, s = 0.5, 0.3
    model, ab_last = _gaussian_eps(m, s)
    noise = torch.randn(1000, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    exact = m + s * (noise - math.sqrt(ab_last) * m) / math.sqrt(ab_last * s**2 + 1 - ab_last)
    err25 = (ddim_sample_loop(create_diffusion("ddim25"), model, noise) - exact).abs().max().item()
    err50 = (ddim_sample_loop(create_diffusion("ddim50"), model, noise) - exact).abs().max().item()
    assert err50 < 0.11 and 1.7 < err25 / err50 < 2.3  # measured 0.100 and ratio 1.92


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_reaches_gaussian_data(learn_sigma):
    m, s = 0.5, 0.3
    model, _ = _gaussian_eps(m, s, learn_sigma)  # learned: v = 0, the log-midpoint of β̃_t and β_t
    noise = torch.randn(1000, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    x = p_sample_loop(create_diffusion("100", learn_sigma=learn_sigma), model, noise,
                      generator=torch.Generator().manual_seed(6))
    assert abs(x.mean().item() - m) < 0.01 and abs(x.std().item() - s) < 0.02

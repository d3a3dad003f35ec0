"""LightningDiT's transport options against hand computations: logit-normal quantiles, the cosine velocity loss,
the shifted ODE grid, and guidance on the first k channels with the interval start."""

from __future__ import annotations

import math

import pytest
import torch

from usp.config import config_from_dict
from usp.diffusion import build_objective, create_transport, sample_ode
from usp.diffusion.lightning import cosine_velocity_loss, sample_t, shift_grid
from usp.models import create_model
from usp.sample.guided import guided_model_fn, sample_latents

# Φ⁻¹(p) of the standard normal at p = 0.05, 0.25, 0.5, 0.75, 0.95
PROBITS = {0.05: -1.6448536, 0.25: -0.6744898, 0.5: 0.0, 0.75: 0.6744898, 0.95: 1.6448536}


def test_logit_normal_times_have_the_quantiles_of_sigmoid_of_a_standard_normal():
    """t = sigmoid(n), n ~ N(0, 1): its p-quantile is sigmoid(Φ⁻¹(p)) (sigmoid is increasing). 200k draws: the
    quantiles' standard error is below 0.002."""
    t = sample_t(0.0, 1.0, "logit_normal", torch.Generator().manual_seed(0), (200_000,))
    for p, z in PROBITS.items():
        assert torch.quantile(t, p).item() == pytest.approx(1 / (1 + math.exp(-z)), abs=0.005), p
    assert 0.0 < t.min() and t.max() < 1.0
    uniform = sample_t(0.0, 1.0, "uniform", torch.Generator().manual_seed(0), (200_000,))
    assert torch.quantile(uniform, 0.05).item() == pytest.approx(0.05, abs=0.005)  # the default stays SiT's
    scaled = sample_t(0.1, 0.5, "logit_normal", torch.Generator().manual_seed(0), (200_000,))
    assert torch.allclose(scaled, 0.1 + 0.4 * t)  # scaled into [t0, t1] as LightningDiT: u·(t1 − t0) + t0


def test_cosine_loss_by_hand_is_per_pixel_over_channels():
    # sample 0: pixel A out (1, 0) vs target (0, 1): cos 0 -> 1; pixel B (1, 1) vs (2, 2): cos 1 -> 0. Mean 0.5.
    # sample 1: pixel A (1, 0) vs (−3, 0): cos −1 -> 2; pixel B (0, 2) vs (0, 5): 0. Mean 1.
    out = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]], [[[1.0, 0.0]], [[0.0, 2.0]]]])  # (N=2, C=2, H=1, W=2)
    target = torch.tensor([[[[0.0, 2.0]], [[1.0, 2.0]]], [[[-3.0, 0.0]], [[0.0, 5.0]]]])
    torch.testing.assert_close(cosine_velocity_loss(out, target), torch.tensor([0.5, 1.0]))
    # over the flattened sample instead it would be 1 − (2+... )/(|.||.|): sample 0 gives 1 − 4/(√3·3) ≈ 0.23, not 0.5
    flat = 1 - torch.nn.functional.cosine_similarity(out.flatten(1), target.flatten(1), dim=1)
    assert not torch.allclose(flat, torch.tensor([0.5, 1.0]), atol=0.05)


def test_training_losses_add_the_cosine_term_to_the_mse_and_report_both():
    torch.manual_seed(0)
    x1, x0, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.rand(3)
    model_fn = lambda x, tt: 0.5 * x + tt.view(-1, 1, 1, 1)  # noqa: E731
    plain = create_transport("linear").training_losses(model_fn, x1, noise=x0, t=t)
    both = create_transport("linear", cosine_loss=True).training_losses(model_fn, x1, noise=x0, t=t)
    u = x1 - x0  # linear path velocity
    cos = cosine_velocity_loss(model_fn(t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, t), u)
    torch.testing.assert_close(both["mse"], plain["loss"])
    torch.testing.assert_close(both["cos_loss"], cos)
    torch.testing.assert_close(both["loss"], plain["loss"] + cos)
    with pytest.raises(ValueError, match="prediction='velocity'"):
        create_transport("linear", prediction="noise", cosine_loss=True)


def test_shifted_grid_values_by_hand():
    """s = 0.3 on t = 0, 1/4, 1/2, 3/4, 1: 0.3t / (1 − 0.7t) = 0, 0.075/0.825, 0.15/0.65, 0.225/0.475, 1."""
    got = shift_grid(torch.linspace(0, 1, 5, dtype=torch.float64), 0.3)
    want = torch.tensor([0.0, 0.075 / 0.825, 0.15 / 0.65, 0.225 / 0.475, 1.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert torch.equal(shift_grid(torch.linspace(0, 1, 5), 0.0), torch.linspace(0, 1, 5))  # 0: no shift
    torch.testing.assert_close(shift_grid(torch.linspace(0, 1, 5), 1.0), torch.linspace(0, 1, 5))  # 1: identity


def test_the_sampler_calls_the_model_on_the_shifted_grid():
    """Euler with 4 steps and shift 0.3 evaluates at the first four shifted points; a recipe key reaches it."""
    calls = []

    def model_fn(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    sample_ode(create_transport("linear"), model_fn, torch.zeros(1, 1, 1, 1), method="euler", num_steps=5,
               timestep_shift=0.3)
    assert calls == pytest.approx([0.0, 0.075 / 0.825, 0.15 / 0.65, 0.225 / 0.475], abs=1e-7)

    class Recorder(torch.nn.Module):
        null_label, num_output_channels = 0, 1

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y):
            calls.append(float(t[0]))
            return torch.zeros_like(x)

    calls.clear()
    gen = config_from_dict({"generation": {"method": "transport", "sampler": "ode", "ode_method": "euler",
                                           "sample_steps": "4", "timestep_shift": 0.3, "cfg_scale": 1.0}}).generation
    sample_latents(Recorder(), gen, torch.tensor([0]), [0], (1, 1, 1))
    assert calls == pytest.approx([0.0, 0.075 / 0.825, 0.15 / 0.65, 0.225 / 0.475], abs=1e-7)


def lightning_forward_with_cfg(model, x, t, y, y_null, cfg_scale, start):
    """hustvl/LightningDiT models/lightningdit.py `forward_with_cfg` with cfg_interval=True, rewritten: guide
    channels 0–2; below the interval start (SiT time t < start) the guided channels take the conditional output."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.chunk(2)
    half = cond if t[0] < start else uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)[: x.shape[0]]


@pytest.mark.parametrize("t_value", [0.05, 0.1, 0.5, 0.95])
def test_guidance_on_three_channels_with_the_interval_start_is_lightningdits(t_value):
    """guided_channels 3 and guidance_interval [0, 1 − 0.10] reproduce LightningDiT's rule at every t; channels ≥ 3
    are always the conditional output, and below t = 0.10 every channel is."""
    torch.manual_seed(0)
    model = create_model("lightningdit_t_1", input_size=4, in_channels=6, depth=2, num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and not name.startswith("feat_rope"):
                p.normal_(0, 0.05)
    x, y = torch.randn(2, 6, 4, 4), torch.tensor([3, 8])
    t = torch.full((2,), t_value)
    preset = config_from_dict({"generation": {"method": "transport", "preset": "lightningdit"}}).generation
    assert (preset.cfg_scale, preset.guided_channels, tuple(preset.guidance_interval)) == (10.0, 3, (0.0, 0.9))
    fn = guided_model_fn(model, y, preset.cfg_scale, preset.guided_channels, interval=preset.guidance_interval,
                         noise_level=build_objective(preset).noise_level)
    with torch.no_grad():
        ours, cond = fn(x, t), model(x, t, y)
        theirs = lightning_forward_with_cfg(model, x, t, y, torch.full_like(y, 10), 10.0, 0.10)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-6)  # channels ≥ k: conditional
    guided = (ours[:, :3] - cond[:, :3]).abs().max() > 1e-3
    assert guided == (t_value >= 0.10)

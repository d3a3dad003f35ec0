"""generation.time: repa — an official REPA SiT checkpoint (4 output channels, REPA's projector keys, REPA's time)
sampled by usp equals REPA's own Euler sampler written out here; the ODE step count is the number of steps."""

from __future__ import annotations

import pytest
import torch

from usp.config import config_from_dict
from usp.diffusion import create_transport
from usp.diffusion.time import in_sit_time
from usp.models import create_model
from usp.models.repa import attach_projectors
from usp.sample.guided import sample_generators, sample_latents
from usp.sample.run import load_generator

SHAPE = (4, 8, 8)  # SD-VAE latents of 64 px images; sit_t_2 sees a 4x4 grid


def repa_checkpoint(path) -> torch.nn.Module:
    """A tiny SiT in REPA's layout: no sigma channels, `projectors.0.*`, saved as train.py saves ({model, ema})."""
    torch.manual_seed(0)
    model = create_model("sit_t_2", input_size=8, in_channels=4, num_classes=10, learn_sigma=False)
    attach_projectors(model, [16], projector_dim=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.05)  # past the zero init: every layer and the time input count
    state = model.state_dict()
    assert model.num_output_channels == 4 and "projectors.0.0.weight" in state
    torch.save({"model": state, "ema": state, "steps": 400000}, path)
    return model


def repa_euler(model, noise, y, num_steps, cfg_scale, guidance_low, guidance_high, null_label):
    """sihyun-yu/REPA samplers.py `euler_sampler` (heun off), rewritten: time 1 (noise) -> 0 (data) in float64,
    num_steps steps, CFG on every channel when cfg_scale > 1 and guidance_low <= t <= guidance_high."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        inputs, labels = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_label)])) if guided else (x, y)
        time = torch.full((inputs.shape[0],), float(t_cur), dtype=torch.float64)
        d = model(inputs.float(), time.float(), labels).double()
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + cfg_scale * (cond - uncond)
        x = x + (t_next - t_cur) * d
    return x.float()


SAMPLING = ["data.image_size=64", "model.num_classes=10", "generation.learn_sigma=false", "generation.sampler=ode",
            "generation.ode_method=euler", "generation.sample_steps=8", "generation.cfg_scale=1.8",
            "generation.guided_channels=null", "generation.guidance_interval=[0.0,0.7]", "run.device=cpu"]


def test_a_repa_checkpoint_sampled_in_repa_time_equals_repas_euler_sampler(tmp_path):
    reference = repa_checkpoint(tmp_path / "last.pt").eval()
    model, config = load_generator(tmp_path / "last.pt", [*SAMPLING, "generation.time=repa"], model_name="sit_t_2")
    assert config.generation.method == "transport" and not hasattr(model, "projectors")
    labels, seeds = torch.tensor([1, 7, 3]), [0, 1, 2]
    ours = sample_latents(model, config.generation, labels, seeds, SHAPE)
    noise = torch.stack([torch.randn(SHAPE, generator=g) for g in sample_generators(seeds, torch.device("cpu"))])
    with torch.no_grad():
        theirs = repa_euler(reference, noise, labels, 8, 1.8, 0.0, 0.7, null_label=10)
    assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()
    assert theirs.std() > 0.5  # a real trajectory, not a vanishing one
    # the guidance interval mattered: guiding every step lands elsewhere
    with torch.no_grad():
        everywhere = repa_euler(reference, noise, labels, 8, 1.8, 0.0, 1.0, null_label=10)
    assert (everywhere - theirs).abs().max() > 1e-3
    # and the time convention has teeth: the same weights read in SiT time give another sample
    config.generation.time = "sit"
    assert (sample_latents(model, config.generation, labels, seeds, SHAPE) - theirs).abs().max() > 1e-2


def test_cfg_at_most_one_samples_unguided(tmp_path):
    """REPA (and DiT, SiT, LightningDiT) guide only when cfg_scale > 1: 1.0 and 0.5 sample the conditional model."""
    reference = repa_checkpoint(tmp_path / "last.pt").eval()
    labels, seeds = torch.tensor([2, 4]), [5, 6]
    noise = torch.stack([torch.randn(SHAPE, generator=g) for g in sample_generators(seeds, torch.device("cpu"))])
    with torch.no_grad():
        theirs = repa_euler(reference, noise, labels, 8, 0.5, 0.0, 1.0, null_label=10)
    for scale in ("1.0", "0.5"):
        model, config = load_generator(tmp_path / "last.pt", [*SAMPLING, "generation.time=repa",
                                                              f"generation.cfg_scale={scale}"], model_name="sit_t_2")
        assert (sample_latents(model, config.generation, labels, seeds, SHAPE) - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("steps", [1, 7, 250])
def test_the_ode_step_count_is_the_number_of_euler_steps(steps):
    """sample_steps counts steps (REPA's num_steps): 250 Euler steps are 250 model calls (SiT's grid gave 249)."""
    calls = []

    class Counting(torch.nn.Module):
        null_label, num_output_channels = 0, 4

        def __init__(self):
            super().__init__()
            self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # samplers read the device off a parameter

        def forward(self, x, t, y):
            calls.append(float(t[0]))
            return torch.zeros_like(x)

        forward_with_cfg = None  # cfg_scale 1: never called

    config = config_from_dict({"generation": {"method": "transport", "sampler": "ode", "ode_method": "euler",
                                              "sample_steps": str(steps), "cfg_scale": 1.0}})
    sample_latents(Counting(), config.generation, torch.tensor([0]), [0], (4, 2, 2))
    assert len(calls) == steps
    assert calls[0] == 0.0 and calls[-1] == pytest.approx(1 - 1 / steps)


def test_training_in_repa_time_is_repas_loss():
    """The objective (SiT time) on the wrapped network equals REPA's loss.py by hand: x_s = (1 − s)·x + s·ε,
    target ε − x, s = 1 − t."""
    torch.manual_seed(0)
    net = create_model("sit_t_2", input_size=8, in_channels=4, num_classes=10, learn_sigma=False)
    with torch.no_grad():
        for p in net.final_layer.parameters():
            p.normal_(0, 0.1)
    x, eps, t, y = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), torch.rand(3), torch.tensor([1, 2, 3])
    wrapped = in_sit_time(net, "repa")
    ours = create_transport("linear").training_losses(lambda x_t, tt: wrapped(x_t, tt, y), x, noise=eps, t=t)["loss"]
    s = (1 - t).view(-1, 1, 1, 1)
    theirs = (net((1 - s) * x + s * eps, s.flatten(), y) - (eps - x)).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

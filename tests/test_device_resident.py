"""No host round-trips in the hot loops: after a warm-up step, a DiT/SiT training step and every sampling step
copy nothing from the host to the device, and per-sample-seeded noise is drawn on the device while keeping each
sample independent of the batch it is drawn in.

The device here is `meta` (no data, every op runs): it stands in for a GPU on any machine, and a host tensor
reaching it shows up as an op with a CPU input and a meta output. DiT's own code (a float64 numpy schedule copied
per look-up) and per-sample CPU generators both fail these tests.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from usp.diffusion import create_diffusion, create_transport, ddim_sample_loop, p_sample_loop, sample_sde
from usp.diffusion.gaussian import randn_like
from usp.models import create_model
from usp.sample.guided import guided_model_fn

META = torch.device("meta")


class HostCopies(TorchDispatchMode):
    """Records every op that takes a host tensor (more than a 0-dim scalar, which kernels receive as an argument)
    and returns a tensor on another device: host-to-device copies, explicit or implicit."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        host_in = [a for a in inputs if a.device.type == "cpu" and (a.dim() > 0 or func.__name__.startswith(
            ("_to_copy", "copy_")))]
        if host_in and any(o.device.type != "cpu" for o in outputs):
            self.copies.append(f"{func.__name__} {[tuple(a.shape) for a in host_in]}")
        return out


def _generator(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(f"{family}_t_2", input_size=8).to(META)


def _host_copies(step) -> list[str]:
    step()  # warm-up: placing schedules on the device once is allowed
    with HostCopies() as mode:
        step()
    return mode.copies


def test_dit_training_step_copies_nothing_from_the_host():
    model, diffusion = _generator("dit"), create_diffusion(None)
    x, y = torch.randn(2, 4, 8, 8, device=META), torch.tensor([1, 2], device=META)

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (2,), device=META)
        diffusion.training_losses(lambda a, s: model(a, s, y), x, t)["loss"].mean().backward()

    assert _host_copies(step) == []


def test_sit_training_step_copies_nothing_from_the_host():
    model, transport = _generator("sit"), create_transport()
    x, y = torch.randn(2, 4, 8, 8, device=META), torch.tensor([1, 2], device=META)
    assert _host_copies(lambda: transport.training_losses(lambda a, s: model(a, s, y), x)["loss"].mean()
                        .backward()) == []


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sde"])
def test_sampling_steps_copy_nothing_from_the_host(sampler):
    family = "sit" if sampler == "sde" else "dit"
    model = _generator(family).eval()
    labels = torch.tensor([1, 2], device=META)
    model_fn = guided_model_fn(model, labels, 4.0, 3)  # CFG: the doubled batch goes through the model
    noise = torch.randn(2, 4, 8, 8, device=META)
    diffusion = create_diffusion("5")
    run = {"ddpm": lambda: p_sample_loop(diffusion, model_fn, noise),
           "ddim": lambda: ddim_sample_loop(diffusion, model_fn, noise, eta=1.0),
           "sde": lambda: sample_sde(create_transport(), model_fn, noise, num_steps=5)}[sampler]
    with torch.no_grad():
        assert _host_copies(run) == []


def test_per_sample_generators_must_live_on_the_batchs_device():
    x = torch.zeros(2, 3, device=META)
    with pytest.raises(ValueError, match="on the batch's device"):
        randn_like(x, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])


def test_per_sample_noise_does_not_depend_on_the_batch():
    """Sample i's noise is a function of its own generator: drawn in a batch of 3 or alone, it is the same."""
    seeds = [11, 12, 13]
    together = randn_like(torch.zeros(3, 4, 2, 2), [torch.Generator().manual_seed(s) for s in seeds])
    alone = torch.cat([randn_like(torch.zeros(1, 4, 2, 2), [torch.Generator().manual_seed(s)]) for s in seeds])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["ddpm", "sde"])
def test_sampled_latents_do_not_depend_on_the_batch_size(sampler):
    from usp.config import GenerationConfig
    from usp.sample.guided import sample_latents

    torch.manual_seed(0)
    family = "sit" if sampler == "sde" else "dit"
    model = create_model(f"{family}_t_2", input_size=4).eval()
    with torch.no_grad():
        for p in model.parameters():  # wake the zero-initialised layers so the output depends on the input
            if not p.any():
                p.normal_(0, 0.02)
    gen = GenerationConfig(method="ddpm" if sampler == "ddpm" else "transport", sampler=sampler, sample_steps="6",
                           cfg_scale=1.5)
    labels, seeds = torch.tensor([3, 4, 5]), [100, 101, 102]
    whole = sample_latents(model, gen, labels, seeds, (4, 4, 4))
    split = torch.cat([sample_latents(model, gen, labels[:2], seeds[:2], (4, 4, 4)),
                       sample_latents(model, gen, labels[2:], seeds[2:], (4, 4, 4))])
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-6)


def test_sampling_autocast_runs_the_network_in_bf16_and_hands_back_float32():
    from usp.run.runtime import autocast_dtype as amp_dtype

    torch.manual_seed(0)
    model = create_model("dit_t_2", input_size=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    seen: list[torch.dtype] = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, t, labels = torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        exact = guided_model_fn(model, labels, 4.0, 3)(x, t)
        fast = guided_model_fn(model, labels, 4.0, 3, amp_dtype("bf16", x.device))(x, t)
    assert seen == [torch.float32, torch.bfloat16] and fast.dtype == torch.float32
    assert 0 < (fast - exact).abs().max() < 0.05 * exact.abs().max()
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("fp32", torch.device("cpu")) is None

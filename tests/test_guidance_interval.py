"""Guidance interval (Kynkäänniemi et al. 2024) in every sampler, and the `generation.preset` settings.

The interval is in noise level t_noise (1 = pure noise, 0 = data, both ends included); docs/conventions.md says how
each sampler's time maps to it. Every sampler runs through `sample_latents` on a tiny random DiT / SiT with fixed
per-sample seeds, so two runs that make the same model calls give bitwise the same latents.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usp.config import GENERATION_PRESETS, GenerationConfig, config_from_dict, load_config
from usp.diffusion import build_objective
from usp.models import create_model
from usp.sample.guided import guided_model_fn, sample_latents

SHAPE = (4, 4, 4)  # latents (C, h, w)
LABELS, SEEDS = torch.tensor([3, 7]), [11, 12]

# name -> GenerationConfig fields; step counts kept small so the hand grids below stay short.
SAMPLERS = {
    "ddpm": dict(method="ddpm", sampler="ddpm", sample_steps="10"),
    "ddim": dict(method="ddpm", sampler="ddim", sample_steps="ddim10"),
    "ode_euler": dict(method="transport", sampler="ode", ode_method="euler", sample_steps="5"),  # 5 steps, 6 points
    "ode_heun": dict(method="transport", sampler="ode", ode_method="heun", sample_steps="5"),
    "sde": dict(method="transport", sampler="sde", sample_steps="6"),
    "sde_vp": dict(method="transport", path="vp", sampler="sde", sample_steps="6"),
}


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(f"{family}_t_2", input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():  # wake the zero-initialised layers so the output depends on x, t and y
            if not p.any():
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"ddpm": _tiny("dit"), "transport": _tiny("sit")}


class Calls:
    """Wraps model.forward: records (batch size, the time of its first row) of every network call."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.log = model, []
        self.inner = type(model).forward.__get__(model)

    def __enter__(self) -> Calls:
        def forward(x, t, y):
            self.log.append((x.shape[0], float(t[0])))
            return self.inner(x, t, y)

        self.model.forward = forward  # forward_with_cfg calls self.forward, so both paths land here
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward

    def times(self, guided: bool) -> list[float]:
        n = len(LABELS) * (2 if guided else 1)
        return [t for size, t in self.log if size == n]


def _sample(models, name: str, **fields) -> tuple[torch.Tensor, Calls]:
    gen = GenerationConfig(**{**SAMPLERS[name], **fields})
    model = models[gen.method]
    with Calls(model) as calls:
        z = sample_latents(model, gen, LABELS, SEEDS, SHAPE)
    return z, calls


@pytest.mark.parametrize("channels", [3, None])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_an_interval_covering_every_noise_level_is_plain_cfg(models, name, channels):
    plain, plain_calls = _sample(models, name, cfg_scale=1.5, guided_channels=channels)
    full, full_calls = _sample(models, name, cfg_scale=1.5, guided_channels=channels, guidance_interval=(0.0, 1.0))
    assert torch.equal(full, plain)
    assert full_calls.log == plain_calls.log and not full_calls.times(guided=False)  # every call guided


@pytest.mark.parametrize("channels", [3, None])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_an_interval_no_step_lands_in_is_the_conditional_model(models, name, channels):
    # No grid below reaches t_noise ∈ [0.05, 0.09]: DDPM 0.111 steps, DDIM 0.1 steps, ODE 0.2 steps,
    # SDE 0.192 steps then 0.04 (the last step), VP SDE ends at 0.04 + its 1e-3 guard.
    cond, cond_calls = _sample(models, name, cfg_scale=1.0, guided_channels=channels)
    never, never_calls = _sample(models, name, cfg_scale=1.5, guided_channels=channels,
                                 guidance_interval=(0.05, 0.09))
    assert torch.equal(never, cond)
    assert never_calls.log == cond_calls.log and not never_calls.times(guided=True)  # half the batch, every call
    guided, _ = _sample(models, name, cfg_scale=1.5, guided_channels=channels)
    assert not torch.allclose(guided, cond)  # guidance does change these samples, so the equality above means something


# The hand grids, in the time each sampler hands the model, with an interval (t_noise) that is not symmetric about
# 0.5, so a mapping that forgot to flip SiT time would guide other calls:
# DDPM "10", [0.5, 0.9]: original steps 999, 888, …, 111, 0 (stride 999/9 = 111); inside: 888 … 555.
# DDIM "ddim10", [0.3, 0.8]: 900, 800, …, 0; inside 800 … 300, both ends included (800 / 1000 = 0.8 exactly).
# ODE "5" steps, [0.5, 0.9]: SiT grid t = 0, 0.2, …, 1, t_noise = 1 − t; Euler calls at t = 0 … 0.8, inside: 0.2, 0.4;
#   Heun calls (t_cur, t_next) of each step, each judged by its own t: inside t = 0.2, 0.2, 0.4, 0.4.
# SDE "6", [0.5, 0.9]: t = linspace(0, 0.96, 6) = 0, 0.192, 0.384, 0.576, 0.768, then the last step at t = 0.96;
#   inside: t = 0.192, 0.384 (t_noise 0.808, 0.616).
PARTIAL = {
    "ddpm": ((0.5, 0.9), [888, 777, 666, 555], [999, 444, 333, 222, 111, 0]),
    "ddim": ((0.3, 0.8), [800, 700, 600, 500, 400, 300], [900, 200, 100, 0]),
    "ode_euler": ((0.5, 0.9), [0.2, 0.4], [0.0, 0.6, 0.8]),
    "ode_heun": ((0.5, 0.9), [0.2, 0.2, 0.4, 0.4], [0.0, 0.6, 0.6, 0.8, 0.8, 1.0]),
    "sde": ((0.5, 0.9), [0.192, 0.384], [0.0, 0.576, 0.768, 0.96]),
}


@pytest.mark.parametrize("name", list(PARTIAL))
def test_a_partial_interval_guides_exactly_the_calls_inside_it(models, name):
    interval, inside, outside = PARTIAL[name]
    _, calls = _sample(models, name, cfg_scale=1.5, guidance_interval=interval)
    assert calls.times(guided=True) == pytest.approx(inside, abs=1e-6)
    assert calls.times(guided=False) == pytest.approx(outside, abs=1e-6)


def noise_level(method: str):
    return build_objective(GenerationConfig(**SAMPLERS["ddpm" if method == "ddpm" else "sde"])).noise_level


def test_noise_level_maps_each_time_convention():
    assert noise_level("ddpm")(torch.tensor([999, 700, 0])).tolist() == [0.999, 0.7, 0.0]
    assert noise_level("transport")(torch.tensor([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]
    with pytest.raises(ValueError, match="method"):
        build_objective(GenerationConfig(method="edm"))


def test_mixed_times_in_one_batch_guide_only_the_rows_inside(models):
    model = models["transport"]
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0.1, 0.5, 0.9, 0.5]), torch.tensor([1, 2, 3, 4])  # t_noise 0.9, 0.5, 0.1, 0.5
    out = guided_model_fn(model, y, 2.0, None, interval=(0.3, 0.7), noise_level=noise_level("transport"))(x, t)
    full = guided_model_fn(model, y, 2.0, None)(x, t)
    cond = guided_model_fn(model, y, 1.0, None)(x, t)
    inside = torch.tensor([False, True, False, True])
    torch.testing.assert_close(out[inside], full[inside], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[~inside], cond[~inside], rtol=1e-5, atol=1e-6)


# ---- presets and validation ----------------------------------------------------------------


def _gen(config) -> dict:
    return dataclasses.asdict(config.generation)


def test_presets_set_the_published_fields():
    dit = load_config(None, ["generation.preset=dit"]).generation
    assert (dit.sampler, dit.sample_steps, dit.cfg_scale, dit.guided_channels, dit.guidance_interval) == \
        ("ddpm", "250", 1.5, 3, None)
    repa = load_config(None, ["generation.method=transport", "generation.preset=repa"]).generation
    assert (repa.sampler, repa.sample_steps, repa.cfg_scale, repa.guided_channels, repa.guidance_interval) == \
        ("sde", "250", 1.8, None, (0.0, 0.7))
    lightning = load_config(None, ["generation.method=transport", "generation.preset=lightningdit"]).generation
    assert (lightning.sampler, lightning.ode_method, lightning.sample_steps, lightning.timestep_shift,
            lightning.cfg_scale, lightning.guided_channels, lightning.guidance_interval) == \
        ("ode", "euler", "249", 0.3, 10.0, 3, (0.0, 0.9))
    assert set(GENERATION_PRESETS) == {"none", "dit", "repa", "lightningdit"}
    assert _gen(load_config(None, ["generation.preset=none"])) == {**_gen(load_config(None)), "preset": "none"}


def test_keys_beside_a_preset_win_and_a_preset_beats_the_base(tmp_path):
    over = load_config(None, ["generation.method=transport", "generation.cfg_scale=1.0", "generation.preset=repa"])
    assert over.generation.cfg_scale == 1.0 and over.generation.guidance_interval == (0.0, 0.7)
    (tmp_path / "base.yaml").write_text("generation: {method: transport, sampler: ode, cfg_scale: 4.0, "
                                        "guided_channels: 3}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ngeneration: {preset: repa, sample_steps: '100'}\n")
    child = load_config(tmp_path / "child.yaml").generation
    assert (child.sampler, child.cfg_scale, child.guided_channels, child.sample_steps) == ("sde", 1.8, None, "100")
    # a stored run recipe (every key set) reloads as it was, and a preset given on top of it replaces its keys
    stored = load_config(tmp_path / "base.yaml").to_dict()
    assert _gen(config_from_dict(load_config(tmp_path / "child.yaml").to_dict())) == _gen(
        load_config(tmp_path / "child.yaml"))
    resampled = config_from_dict(stored, ["generation.preset=repa", "generation.cfg_scale=2.5"]).generation
    assert (resampled.sampler, resampled.cfg_scale, resampled.guidance_interval) == ("sde", 2.5, (0.0, 0.7))


def test_a_preset_for_the_other_method_errors_naming_it():
    with pytest.raises(ValueError, match="generation.preset=dit .*generation.method=transport"):
        load_config(None, ["generation.method=transport", "generation.preset=dit"])
    with pytest.raises(ValueError, match="generation.preset"):
        load_config(None, ["generation.preset=edm"])


@pytest.mark.parametrize("bad", ["[0.8, 0.2]", "[0, 1.5]", "[-0.1, 0.5]", "[0.5]", "[0, 0.5, 1]", "abc"])
def test_a_bad_interval_is_one_error_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"generation\.guidance_interval .*(\[low, high\]|list of 2)"):
        load_config(None, [f"generation.guidance_interval={bad}"])
    if bad == "[0.8, 0.2]":
        with pytest.raises(ValueError, match="low <= high"):
            guided_model_fn(create_model("dit_t_2", input_size=4), LABELS, 1.5, 3, interval=(0.8, 0.2))


def test_an_interval_round_trips_through_a_stored_recipe():
    config = load_config(None, ["generation.guidance_interval=[0.1, 0.7]"])
    assert config.generation.guidance_interval == (0.1, 0.7)
    assert config_from_dict(config.to_dict()).generation.guidance_interval == (0.1, 0.7)


def test_a_preset_applies_to_a_public_sit_checkpoint(tmp_path):
    # A .pt without usp metadata gets SiT's method and ODE sampler as defaults; a preset on the command line wins.
    from usp.sample.run import build_generator, load_generator

    sizes = ["data.image_size=32", "model.num_classes=10"]
    path = tmp_path / "sit.pt"
    torch.save(build_generator(load_config(None, [*sizes, "model.name=sit_t_2"])).state_dict(), path)
    plain = load_generator(path, sizes, model_name="sit_t_2")[1].generation
    repa = load_generator(path, [*sizes, "generation.preset=repa"], model_name="sit_t_2")[1].generation
    assert (plain.method, plain.sampler) == ("transport", "ode")
    assert (repa.method, repa.sampler, repa.cfg_scale, repa.guidance_interval) == ("transport", "sde", 1.8, (0.0, 0.7))


def _repa_reference(model, labels, seeds, cfg_scale: float, high: float, steps: int) -> tuple[torch.Tensor, int]:
    """REPA's Euler–Maruyama sampler with its guidance interval, written here independently in REPA's time
    (t_noise: 1 = noise → 0 = data, float64 state, grid linspace(1, 0.04, steps) then a mean step to 0), for the
    linear path x = (1 − t) x_data + t ε. A usp SiT predicts SiT's velocity at SiT time 1 − t, which is minus
    REPA's velocity v = ε − x_data. With ε = x + (1 − t) v and score s = −ε / t, REPA's reverse drift
    v − ½·(2t)·s is x + (2 − t) v. Guidance mixes the drifts of the two halves, where 0 ≤ t ≤ high (inclusive).
    Returns (x_data, number of guided calls)."""
    gens = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]  # sample_generators' streams
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in gens]).double()
    null = torch.full_like(labels, model.null_label)

    def drift(x: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
        t_sit = torch.full((x.shape[0],), 1 - t, dtype=torch.float32)
        d = {}
        for key, y in (("cond", labels), ("uncond", null)):
            v = -model(x.float(), t_sit, y).double()
            d[key] = x + (2 - t) * v
        guided = 0 <= t <= high
        return (d["uncond"] + cfg_scale * (d["cond"] - d["uncond"]) if guided else d["cond"]), guided

    grid = torch.linspace(1.0, 0.04, steps, dtype=torch.float64).tolist()
    n_guided = 0
    with torch.no_grad():
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t_cur
            eps = torch.stack([torch.randn(SHAPE, generator=g) for g in gens]).double()
            d, guided = drift(x, t_cur)
            x = x + d * dt + (2 * t_cur) ** 0.5 * eps * abs(dt) ** 0.5
            n_guided += guided
        d, guided = drift(x, grid[-1])
        x = x + d * (0.0 - grid[-1])
    return x.float(), n_guided + guided


def test_the_repa_preset_samples_as_repas_euler_maruyama_with_its_interval():
    torch.manual_seed(0)
    model = create_model("sit_t_2", input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
        model.y_embedder.embedding_table.weight.normal_(0, 1.0)  # labels matter, so guidance moves the samples
    gen = load_config(None, ["generation.method=transport", "generation.preset=repa"]).generation
    with Calls(model) as calls:
        ours = sample_latents(model, gen, LABELS, SEEDS, SHAPE)
    # 250 calls at t_noise = 1 − 0.96 k / 249 (k = 0 … 249, the last the mean step at 0.04): ≤ 0.7 from k = 78 on
    assert (len(calls.times(guided=True)), len(calls.times(guided=False))) == (172, 78)
    reference, n_guided = _repa_reference(model, LABELS, SEEDS, 1.8, 0.7, 250)
    assert n_guided == 172
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # float32 vs REPA's float64: ~1e-6 here
    everywhere = _repa_reference(model, LABELS, SEEDS, 1.8, 1.0, 250)[0]
    assert (ours - everywhere).abs().max() > 1e-3  # guiding every step lands elsewhere (0.04 here)

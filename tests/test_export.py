"""`usp export` to diffusers, timm and a Hub folder, and usp reading them back (tiny networks, CPU, offline)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usp.config import config_from_dict
from usp.export import export
from usp.latent.small_vae import SmallVAE
from usp.models import create_model
from usp.models.diffusers import from_diffusers_state, match_dit_time_embedding, to_diffusers_state, transformer_config
from usp.run.checkpoint import save_weights
from usp.sample.diffusers import load_diffusers_generator

C = 8  # small-f4 latents: 8 channels, 8×8 for 32 px images


@pytest.fixture(scope="module")
def small_vae_dir(tmp_path_factory) -> Path:
    """The demo's kind of VAE (usp SmallVAE), random, with a per-channel scale and a shift."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae = SmallVAE(width=8)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(folder)
    (folder / "latent_stats.json").write_text(json.dumps({"scale": [0.5 + 0.1 * c for c in range(C)], "shift": 0.2}))
    return folder


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (DiT's zero-initialised adaLN and output layers would make every output 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_run(root: Path, name: str, task: str, overrides: list[str], state: dict | None = None) -> Path:
    """A run folder holding one weights file with usp's metadata, as the engine writes it. Returns the file."""
    config = config_from_dict({}, [f"run.task={task}", f"model.name={name}", "data.source=fashion_mnist",
                                   "data.image_size=32", "model.num_classes=10", *overrides])
    if state is None:
        from usp.export import build_run_generator  # noqa: F401  (same builder the export uses)
        from usp.sample.run import build_generator

        state = _perturbed(build_generator(config)).state_dict()
    meta = {"task": task, "model": name, "step": 7, "ema": True, "config": config.to_dict()}
    run = root / name
    return save_weights(run / "checkpoints", 7, state, meta)


def _generator_overrides(vae: Path, family: str) -> list[str]:
    common = ["latent.space=small-f4", f"latent.path={vae}", "model.affine_norms=true"]
    if family == "sit":
        return [*common, "generation.method=transport", "generation.sampler=ode", "generation.ode_method=heun",
                "generation.sample_steps=6", "generation.cfg_scale=2.0", "generation.guided_channels=null"]
    return [*common, "generation.sampler=ddim", "generation.sample_steps=ddim10", "generation.cfg_scale=2.0",
            f"generation.guided_channels={C}"]


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,affine", [("dit_t_1", True), ("dit_t_2", False), ("sit_t_1", True)])
def test_diffusers_transformer_equals_usp_network(name, affine):
    from diffusers import DiTTransformer2DModel

    model = _perturbed(create_model(name, input_size=8, in_channels=C, num_classes=10, affine_norms=affine))
    transformer = DiTTransformer2DModel(**transformer_config(model)).eval()
    transformer.load_state_dict(to_diffusers_state(model), strict=True)
    x, y = torch.randn(4, C, 8, 8), torch.tensor([0, 3, 9, 10])  # 10 = usp's null label
    t = torch.tensor([0, 250, 500, 999]) if name.startswith("dit") else torch.tensor([0.0, 0.3, 0.7, 1.0])
    with torch.no_grad():
        ref = model(x, t, y)
        as_loaded = transformer(x, timestep=t, class_labels=torch.where(y == 10, 1000, y)).sample[:, : ref.shape[1]]
        match_dit_time_embedding(transformer)
        out = transformer(x, timestep=t, class_labels=torch.where(y == 10, 1000, y)).sample[:, : ref.shape[1]]
    assert (out - ref).abs().max().item() < 1e-5  # exact but for float rounding (affine norms folded)
    # diffusers' own timestep frequencies (k/127, DiT's k/128) are the only difference: visible at t = 999
    assert (as_loaded - ref).abs().max().item() > 1e-4


def test_dit_xl_2_export_loads_strictly_in_diffusers_on_meta(tmp_path):
    """The public DiT-XL/2 layout (facebook/DiT-XL-2-256: 16 heads × 72, 28 layers, 32×32×4 latents, patch 2,
    8 output channels, 1000 classes + null): the config.json we write (with its `_usp` block) builds the model in
    diffusers, our mapping fills exactly its keys and shapes, and reads back into usp's dit_xl_2."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        dit = create_model("dit_xl_2", input_size=32)
    cfg = transformer_config(dit)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **cfg,
                                                      "_usp": {"family": "dit"}}))
    with torch.device("meta"):
        transformer = DiTTransformer2DModel.from_config(DiTTransformer2DModel.load_config(str(tmp_path)))
    public = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    assert {k: cfg[k] for k in public} == public
    state = to_diffusers_state(dit)
    result = transformer.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = transformer.state_dict()
    assert all(own[k].shape == v.shape for k, v in state.items())
    back = from_diffusers_state(state, 28, 1000, 1000)
    with torch.device("meta"):
        again = create_model("dit_xl_2", input_size=32)
    back["pos_embed"] = again.pos_embed
    again.load_state_dict(back, strict=True, assign=True)


def test_public_diffusers_dit_folder_reads_back(tmp_path):
    """A DiT in diffusers layout without usp's block (as the Hub's facebook/DiT-XL-2-256): usp infers the registry
    model from its config and samples the same network; embedder copies that disagree are refused."""
    from diffusers import DiTTransformer2DModel

    model = _perturbed(create_model("dit_t_2", input_size=4, in_channels=4, num_classes=1000))
    transformer = DiTTransformer2DModel(**{**transformer_config(model), "norm_eps": 1e-5})
    transformer.load_state_dict(to_diffusers_state(model), strict=True)
    transformer.save_pretrained(tmp_path / "pub" / "transformer")
    (tmp_path / "pub" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    loaded, config = load_diffusers_generator(tmp_path / "pub")
    assert config.model.name == "dit_t_2" and config.data.image_size == 32 and config.model.num_classes == 1000
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([3, 900]), torch.tensor([5, 1000])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    state = transformer.state_dict()
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="differs from block 0"):
        from_diffusers_state(state, model.depth, 1000, 1000)


def _pipeline_images(out: Path, labels: list[int], seeds: list[int], steps: int, cfg: float,
                     match_time: bool = True) -> torch.Tensor:
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(str(out))
    if match_time:
        match_dit_time_embedding(pipe.transformer)
    generators = [torch.Generator().manual_seed(s + 1_000_003) for s in seeds]  # usp's per-sample noise seeds
    return pipe(class_labels=labels, guidance_scale=cfg, generator=generators, num_inference_steps=steps,
                output_type="pt").images  # (N, 3, H, W) in [0, 1]


def test_dit_pipeline_equals_usp_sample(tmp_path, small_vae_dir):
    """DiTPipeline.from_pretrained(OUT) (DDIM, 10 steps, CFG 2 on all 8 channels) == usp's sampler with the same
    per-sample noise: usp sample ddim / ddim10 / cfg 2 / guided_channels 8, on the exported folder read back."""
    from usp.sample.guided import sample_latents
    from usp.sample.run import load_generator

    weights = write_run(tmp_path, "dit_t_1", "finetune", _generator_overrides(small_vae_dir, "dit"))
    out, notes = export(weights, "diffusers", tmp_path / "out")
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["usp.export.vae", "SmallVAEForDiffusers"] and index["id2label"]["9"] == "Ankle boot"
    labels, seeds = [0, 3, 7, 9], [0, 1, 2, 3]
    images = _pipeline_images(out, labels, seeds, 10, 2.0)

    from usp.run.weights import resolve_weights

    assert resolve_weights(out) == out  # `usp sample OUT` hands the folder itself to load_generator
    model, config = load_generator(out)
    from usp.latent.vae import LatentSpace

    z = sample_latents(model, config.generation, torch.tensor(labels), seeds, (C, 8, 8))
    latent = LatentSpace.load(config.latent.space, config.latent.path)
    ref = (latent.decode(z) / 2 + 0.5).clamp(0, 1)
    assert (images - ref).abs().max().item() < 1e-4


EULER_INTERVAL = ["generation.ode_method=euler", "generation.sample_steps=5", "generation.cfg_scale=1.5",
                  "generation.guided_channels=4", "generation.guidance_interval=[0.0,0.7]"]
REPA_SHIFT = ["generation.ode_method=euler", "generation.sample_steps=4", "generation.time=repa",
              "generation.timestep_shift=0.3"]


@pytest.mark.parametrize("sampler", [[], EULER_INTERVAL, REPA_SHIFT],
                         ids=["heun-cfg-all", "euler-4-channels-interval", "repa-time-shifted-grid"])
def test_sit_export_card_sampler_equals_usp(tmp_path, small_vae_dir, sampler):
    """The SiT card's diffusers-only loop (Heun 6 steps, CFG 2 on all channels; Euler 5 steps, CFG 1.5 on 4 channels
    inside a guidance interval; a network trained in REPA time on a shifted Euler grid) gives usp's samples;
    diffusers' FlowMatchEulerDiscreteScheduler with the card's sigmas gives usp's Euler ODE."""
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from usp.diffusion import create_transport, sample_ode
    from usp.sample.guided import guided_model_fn, sample_latents
    from usp.sample.run import load_generator

    weights = write_run(tmp_path, "sit_t_1", "finetune", [*_generator_overrides(small_vae_dir, "sit"), *sampler])
    out, _ = export(weights, "hub", tmp_path / "hub")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "zalando-datasets/fashion_mnist" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"OUT"', repr(str(out)))
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102  the card's own code, as a reader would run it
    labels, seeds = torch.tensor([1, 4, 8]), [5, 6, 7]
    card_z = namespace["sample"](labels, [torch.Generator().manual_seed(s + 1_000_003) for s in seeds])
    model, config = load_generator(out)
    ref = sample_latents(model, config.generation, labels, seeds, (C, 8, 8))
    assert (card_z - ref).abs().max().item() < 1e-4

    net = DiTTransformer2DModel.from_pretrained(str(out), subfolder="transformer").eval()
    match_dit_time_embedding(net)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    ts = torch.linspace(0, 1, 6)
    scheduler.set_timesteps(sigmas=(1 - ts[:-1]).tolist())
    x = noise = torch.randn(3, C, 8, 8)
    with torch.no_grad():
        for sigma_t in scheduler.timesteps:
            t = (1 - sigma_t / 1000).expand(3)
            x = scheduler.step(-net(x, timestep=t, class_labels=labels).sample[:, :C], sigma_t, x).prev_sample
    fn = guided_model_fn(model, labels, 1.0, None)
    euler = sample_ode(create_transport("linear"), fn, noise, method="euler", num_steps=6)[0]
    assert (x - euler).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def _encoder_state(name: str, task: str, global_pool: bool = True) -> dict:
    if task == "pretrain":
        return _perturbed(create_model(name, latent_size=8, in_channels=C)).state_dict()
    model = create_model(name, latent_size=8, in_channels=C, num_classes=10, global_pool=global_pool)
    if task == "probe":
        from usp.train.tasks.classification import LinearProbeHead

        model.head = LinearProbeHead(model.head.in_features, 10)
        model.head[0].running_mean.normal_()
        model.head[0].running_var.uniform_(0.5, 2.0)
    return _perturbed(model).state_dict()


@pytest.mark.parametrize("name,task,pool", [("vit_t_1", "pretrain", True), ("vit_t_1_cls", "probe", False),
                                            ("vit_t_2_cls", "classify", True)])
def test_timm_features_equal_usp_encoder(tmp_path, small_vae_dir, name, task, pool):
    import timm

    state = _encoder_state(name, task, pool)
    weights = write_run(tmp_path, name, task, ["latent.space=small-f4", f"latent.path={small_vae_dir}",
                                               f"model.global_pool={str(pool).lower()}"], state)
    out, _ = export(weights, "timm", tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["in_chans"] == C and config["model_args"]["img_size"] == 8
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    args = config["model_args"]
    overlay = timm.create_model("vit_base_patch16_224", pretrained=True, **args, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), input_size=(C, 8, 8), num_classes=args["num_classes"])).eval()
    x = torch.randn(3, C, 8, 8)
    with torch.no_grad():
        if task == "pretrain":
            usp = create_model(name, latent_size=8, in_channels=C)
            usp.load_state_dict(state)
            noise = torch.arange(float(usp.num_patches)).expand(3, -1)  # keep-all masking in the original token order
            ref = usp.eval().forward_encoder(x, 0.0, noise)[0]  # (N, 1+L, D) after the final norm
            got, again = net.forward_features(x), overlay.forward_features(x)
        else:
            from usp.models.vit import VisionTransformer

            usp = create_model(name, latent_size=8, in_channels=C, num_classes=10, global_pool=pool)
            if task == "probe":
                from usp.train.tasks.classification import LinearProbeHead

                usp.head = LinearProbeHead(usp.head.in_features, 10)
            usp.load_state_dict(state)
            assert isinstance(usp, VisionTransformer)
            ref = usp.eval()(x)  # logits (probe head folded into timm's Linear)
            got, again = net(x), overlay(x)
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
            assert (feats - usp.forward_features(x)).abs().max().item() < 1e-5
    assert (got - ref).abs().max().item() < 1e-4 and torch.equal(got, again)


def test_probe_reads_timm_export_as_model_init(tmp_path, small_vae_dir):
    """`model.init=OUT_TIMM`: the exported encoder transfers into a classifier exactly as the usp weights do."""
    from usp.models.transfer import transfer_weights
    from usp.run.weights import load_weights

    state = _encoder_state("vit_t_1", "pretrain")
    weights = write_run(tmp_path, "vit_t_1", "pretrain", ["latent.space=small-f4", f"latent.path={small_vae_dir}"],
                        state)
    out, _ = export(weights, "timm", tmp_path / "timm")
    a, b = (create_model("vit_t_1_cls", latent_size=8, in_channels=C, num_classes=10, global_pool=False)
            for _ in range(2))
    transfer_weights(load_weights(weights)[0], a)
    report = transfer_weights(load_weights(out)[0], b)
    assert "head.weight" in report.newly_initialised
    for key in ("blocks.3.attn.qkv.weight", "pos_embed", "cls_token", "norm.weight"):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])


# --------------------------------------------------------------------------------------------
# hub, the CLI, bad input
# --------------------------------------------------------------------------------------------


def test_hub_card_reports_every_logged_metric(tmp_path, small_vae_dir):
    import yaml

    state = _encoder_state("vit_t_1_cls", "probe", False)
    weights = write_run(tmp_path, "vit_t_1_cls", "probe", ["latent.space=small-f4", f"latent.path={small_vae_dir}",
                                                           "model.global_pool=false"], state)
    run = weights.parent.parent
    rows = [{"step": 7, "epoch": 1.0, "images_seen": 112, "lr": 0.1, "loss": 1.2345},
            {"step": 7, "eval": {"top1": 71.25, "top5": 98.5}}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "result.json").write_text(json.dumps({"top1": 71.25, "protocol": {
        "name": "linear probe (paper protocol, Table 12)", "classifier": "BN + linear", "schedule": "1 epoch",
        "augmentation": "flip"}}))
    out, _ = export(run, "hub", tmp_path / "hub", license="apache-2.0")
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0" and "usp" in meta["tags"]
    assert "| top1 | 71.25 | 7 | linear probe (paper protocol, Table 12)" in card
    assert "| top5 | 98.5 |" in card and "| training loss | 1.2345 | 7 |" in card
    assert (out / "usp" / "weights.safetensors").read_bytes() == weights.read_bytes()
    assert "model.name: vit_t_1_cls" in (out / "usp" / "recipe.yaml").read_text().replace("\n  ", "\nmodel.")


def test_bad_inputs_are_one_clear_error(tmp_path, small_vae_dir):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    from usp import RunError

    with pytest.raises(RunError, match="cannot be read"):
        export(garbage, "diffusers", tmp_path / "a")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a usp weights file"):
        export(foreign, "timm", tmp_path / "b")
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(ValueError, match="not a usp weights file"):
        export(pt, "hub", tmp_path / "c")
    dit = write_run(tmp_path, "dit_t_1", "finetune", _generator_overrides(small_vae_dir, "dit"))
    with pytest.raises(ValueError, match=r"--to timm cannot hold it|which --to timm cannot hold"):
        export(dit, "timm", tmp_path / "d")
    vit = write_run(tmp_path, "vit_t_1", "pretrain", ["latent.space=small-f4", f"latent.path={small_vae_dir}"],
                    _encoder_state("vit_t_1", "pretrain"))
    with pytest.raises(ValueError, match="which --to diffusers cannot hold.*--to timm or --to hub"):
        export(vit, "diffusers", tmp_path / "e")
    from usp.sample.run import build_generator

    resized = build_generator(config_from_dict({}, ["run.task=finetune", "model.name=dit_t_1", "data.image_size=32",
                                                    "data.source=fashion_mnist", "model.num_classes=10",
                                                    *_generator_overrides(small_vae_dir, "dit")])).state_dict()
    resized["pos_embed"] = resized["pos_embed"] * 0.9  # e.g. a table pretrained at another grid, resized
    moved = write_run(tmp_path / "resized", "dit_t_1", "finetune", _generator_overrides(small_vae_dir, "dit"), resized)
    with pytest.raises(ValueError, match="position table is not the 8x8 sin-cos table"):
        export(moved, "diffusers", tmp_path / "f")
    hub, notes = export(moved, "hub", tmp_path / "g")  # the Hub folder keeps the usp file and says why
    assert not (hub / "transformer").exists() and (hub / "usp" / "weights.safetensors").is_file()
    assert "library_name: usp" in (hub / "README.md").read_text() and "position table" in notes[0]
    lightning = write_run(tmp_path / "ld", "lightningdit_t_1", "finetune",
                          [*_generator_overrides(small_vae_dir, "sit"), "model.affine_norms=false"])
    with pytest.raises(ValueError, match="which --to diffusers cannot hold.*export it --to hub"):
        export(lightning, "diffusers", tmp_path / "h")
    hub, notes = export(lightning, "hub", tmp_path / "i")
    assert "no diffusers or timm folder" in notes[0] and "library_name: usp" in (hub / "README.md").read_text()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export(vit, "timm", tmp_path / "taken")
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written export left behind


def test_cli_export_error_is_one_line(tmp_path, small_vae_dir):
    vit = write_run(tmp_path, "vit_t_1", "pretrain", ["latent.space=small-f4", f"latent.path={small_vae_dir}"],
                    _encoder_state("vit_t_1", "pretrain"))
    done = subprocess.run([sys.executable, "-m", "usp", "export", str(vit), "--to", "diffusers", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--to timm or --to hub" in lines[0]


def test_sd_vae_dit_export_references_the_hub_vae(tmp_path):
    """For the paper's SD-VAE spaces the folder names no VAE copy (vae: [null, null]) and the note says which one
    to pass; DiTPipeline.from_pretrained(OUT, vae=...) then samples (a tiny AutoencoderKL stands in offline)."""
    from diffusers import AutoencoderKL, DiTPipeline

    weights = write_run(tmp_path, "dit_t_2", "finetune", ["latent.space=sd-vae-ft-ema"])
    out, notes = export(weights, "diffusers", tmp_path / "out")
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]
    assert any("stabilityai/sd-vae-ft-ema" in n for n in notes)
    usp_block = json.loads((out / "transformer" / "config.json").read_text())["_usp"]
    assert usp_block["latent"] == {"space": "sd-vae-ft-ema", "channels": 4, "factor": 8, "scale": 0.18215,
                                   "shift": 0.0, "vae": "stabilityai/sd-vae-ft-ema"}
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4, sample_size=4,
                        scaling_factor=0.18215)
    pipe = DiTPipeline.from_pretrained(str(out), vae=vae)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert images.shape == (2, 4, 4, 3)  # this stand-in VAE does not upsample; the point is that it loads and runs

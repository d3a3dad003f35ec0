"""Numbers behind `usp export` (issue 26): tiny demo-size networks with random weights, CPU, offline.

Prints the max abs difference of: the diffusers transformer vs the usp network (as diffusers loads it, and with
DiT's timestep frequencies set); DiTPipeline.from_pretrained(OUT) vs `usp sample OUT` (the CLI, same noise, DDIM
10 steps, CFG 2 on all 8 channels); the SiT card's diffusers-only Heun loop vs usp's sampler; timm vs usp encoder.
Run: PYTHONPATH=. python scripts/export_parity.py /tmp/parity
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import C, _encoder_state, _generator_overrides, _perturbed, _pipeline_images, write_run  # noqa: E402

from usp.export import export  # noqa: E402
from usp.latent.small_vae import SmallVAE  # noqa: E402
from usp.models import create_model  # noqa: E402
from usp.models.diffusers import match_dit_time_embedding, to_diffusers_state, transformer_config  # noqa: E402


def main(root: Path) -> None:
    from diffusers import DiTTransformer2DModel

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    vae_dir = root / "vae"
    vae = _perturbed(SmallVAE(width=8), 1)
    vae.save_pretrained(vae_dir)
    (vae_dir / "latent_stats.json").write_text(json.dumps({"scale": [0.5 + 0.1 * c for c in range(C)], "shift": 0.2}))

    for name in ("dit_t_1", "sit_t_1"):
        model = _perturbed(create_model(name, input_size=8, in_channels=C, num_classes=10, affine_norms=True))
        net = DiTTransformer2DModel(**transformer_config(model)).eval()
        net.load_state_dict(to_diffusers_state(model), strict=True)
        x, y = torch.randn(8, C, 8, 8), torch.arange(8)
        t = torch.linspace(0, 999, 8).round().long() if name.startswith("dit") else torch.linspace(0, 1, 8)
        with torch.no_grad():
            ref = model(x, t, y)
            loaded = net(x, timestep=t, class_labels=y).sample[:, : ref.shape[1]]
            match_dit_time_embedding(net)
            matched = net(x, timestep=t, class_labels=y).sample[:, : ref.shape[1]]
        print(f"{name} (affine norms folded) transformer vs usp: as loaded {(loaded - ref).abs().max():.3g}, "
              f"DiT time frequencies {(matched - ref).abs().max():.3g} (|output| max {ref.abs().max():.3g})")

    weights = write_run(root, "dit_t_1", "finetune", _generator_overrides(vae_dir, "dit"))
    out = export(weights, "diffusers", root / "dit_diffusers")[0]
    settings = ["generation.sampler=ddim", "generation.sample_steps=ddim10", "generation.cfg_scale=2.0",
                f"generation.guided_channels={C}"]
    subprocess.run([sys.executable, "-m", "usp", "sample", str(out), "--num-samples", "8", "--balanced", "--seed", "0",
                    "--out", str(root / "samples"), "--grid", "0", *settings], check=True)
    npz = np.load(root / "samples" / "samples_8.npz")["arr_0"].astype(np.int64)
    images = _pipeline_images(out, list(range(8)), list(range(8)), 10, 2.0)
    pipe_u8 = (images * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int64)
    loaded = _pipeline_images(out, list(range(8)), list(range(8)), 10, 2.0, match_time=False)
    loaded_u8 = (loaded * 255).round().permute(0, 2, 3, 1).numpy().astype(np.int64)
    print(f"DiTPipeline vs `usp sample` (DDIM 10 steps, CFG 2.0 on {C} channels, 8 samples, per-sample seeds): max "
          f"abs diff {np.abs(pipe_u8 - npz).max()} uint8 levels with DiT's time frequencies set, "
          f"{np.abs(loaded_u8 - npz).max()} as diffusers loads it")

    weights = write_run(root, "sit_t_1", "finetune", _generator_overrides(vae_dir, "sit"))
    hub = export(weights, "hub", root / "sit_hub")[0]
    code = re.search(r"```python\n(.*?)```", (hub / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(code.replace('"OUT"', repr(str(hub))), namespace)  # noqa: S102
    from usp.sample.guided import sample_latents
    from usp.sample.run import load_generator

    labels, seeds = torch.arange(8) % 10, list(range(8))
    card = namespace["sample"](labels, [torch.Generator().manual_seed(s + 1_000_003) for s in seeds])
    model, config = load_generator(hub)
    ref = sample_latents(model, config.generation, labels, seeds, (C, 8, 8))
    print(f"SiT card loop (diffusers only) vs usp sampler (ODE Heun, 6 steps, CFG 2.0 all channels): max abs "
          f"diff {(card - ref).abs().max():.3g} (latents, |max| {ref.abs().max():.3g})")

    import timm

    for name, task, pool in (("vit_t_1", "pretrain", True), ("vit_t_1_cls", "probe", False),
                             ("vit_t_2_cls", "classify", True)):
        state = _encoder_state(name, task, pool)
        weights = write_run(root, name, task, ["latent.space=small-f4", f"latent.path={vae_dir}",
                                               f"model.global_pool={str(pool).lower()}"], state)
        folder = export(weights, "timm", root / f"timm_{name}_{task}")[0]
        net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        x = torch.randn(8, C, 8, 8)
        with torch.no_grad():
            if task == "pretrain":
                usp = create_model(name, latent_size=8, in_channels=C)
                usp.load_state_dict(state)
                noise = torch.arange(float(usp.num_patches)).expand(8, -1)
                diff = (net.forward_features(x) - usp.eval().forward_encoder(x, 0.0, noise)[0]).abs().max()
                what = "encoder tokens after the final norm"
            else:
                usp = create_model(name, latent_size=8, in_channels=C, num_classes=10, global_pool=pool)
                if task == "probe":
                    from usp.train.tasks.classification import LinearProbeHead

                    usp.head = LinearProbeHead(usp.head.in_features, 10)
                usp.load_state_dict(state)
                feats = net.forward_head(net.forward_features(x), pre_logits=True)
                diff = max((feats - usp.eval().forward_features(x)).abs().max(), (net(x) - usp(x)).abs().max())
                what = "pooled features and logits" + (" (BN probe head folded)" if task == "probe" else "")
        print(f"timm vs usp {name} ({task}): {what}: max abs diff {diff:.3g}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/usp_export_parity"))

"""Contract tests over every registered model (the registry in `usp.models`), as timm's test_models does.

For each name: forward and backward are finite on a tiny input (the name's width, heads and patch size,
depth cut to 2 so the 70 variants run in seconds); the full-size state-dict layout (built on the meta
device) matches the snapshot in tests/snapshots/registry.json; and transfer from the same-size MAE covers
every block of a DiT/SiT or classifier. Regenerate the snapshot after a deliberate layout change with
`python tests/test_registry.py` and review its diff.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from usp.models import REGISTRY, SIZES, classifier_for, create_model, list_models, model_entry
from usp.models.transfer import transfer_weights

SNAPSHOT = Path(__file__).parent / "snapshots" / "registry.json"
NAMES = list_models()
LATENT = dict(size=8, channels=4)  # 8x8x4 latents: every patch size (1, 2, 4, 8) divides 8
FULL_SIZE_INPUT = {"vit": dict(latent_size=32, in_channels=4), "vit_cls": dict(latent_size=32, in_channels=4),
                   "vit_lightning": dict(latent_size=16, in_channels=32),
                   "dit": dict(input_size=32, in_channels=4), "sit": dict(input_size=32, in_channels=4),
                   "lightningdit": dict(input_size=16, in_channels=32)}  # LightningDiT's VA-VAE f16d32 input
GENERATORS = ("dit", "sit", "lightningdit")


def tiny(name: str, depth: int = 2, **overrides) -> torch.nn.Module:
    family = model_entry(name).family
    size = {"input_size": LATENT["size"]} if family in GENERATORS else {"latent_size": LATENT["size"]}
    if family in GENERATORS:
        overrides.setdefault("num_classes", 10)
    if family == "vit_cls":
        overrides.setdefault("num_classes", 10)
    if family in ("vit", "vit_lightning"):  # the decoder is 512 wide for every size: one block of it is enough here
        overrides.setdefault("decoder_depth", 1)
    return create_model(name, depth=depth, in_channels=LATENT["channels"], **size, **overrides)


def layout(model: torch.nn.Module) -> dict[str, object]:
    """Keys with per-block indices folded to `*`, their shapes, the depth and the parameter count."""
    folded: dict[str, list[int]] = {}
    for key, value in model.state_dict().items():
        folded[re.sub(r"^(blocks|decoder_blocks)\.\d+\.", r"\1.*.", key)] = list(value.shape)
    listing = json.dumps(sorted(folded.items()))
    return {"keys": sorted(folded), "key_hash": hashlib.sha256(listing.encode()).hexdigest()[:16],
            "num_params": sum(v.numel() for v in model.state_dict().values())}


def full_size_layout(name: str) -> dict[str, object]:
    with torch.device("meta"):
        return layout(create_model(name, **FULL_SIZE_INPUT[model_entry(name).family]))


def test_registry_counts_every_family_and_size():
    families = {entry.family for entry in REGISTRY.values()}
    assert families == {"vit", "vit_cls", "dit", "sit", "lightningdit", "vit_lightning"}
    # LightningDiT and its encoder: sizes t, b, l, xl at patch 1 and 2
    assert len(NAMES) == len(SIZES) * (3 + 3 + 4 + 4) + 2 * 4 * 2 == 86
    assert {"vit_b_2", "vit_b_2_cls", "dit_xl_2", "sit_xl_2", "vit_b_1"} <= set(NAMES)
    assert classifier_for("vit_l_2") == "vit_l_2_cls" and classifier_for("vit_l_2_cls") == "vit_l_2_cls"
    with pytest.raises(ValueError, match="not a registered vit/vit_cls model; choose one of: vit_t_1"):
        classifier_for("dit_b_2")


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_finite(name):
    torch.manual_seed(0)
    family = model_entry(name).family
    model = tiny(name)
    x = torch.randn(2, LATENT["channels"], LATENT["size"], LATENT["size"])
    if family in ("vit", "vit_lightning"):
        loss, pred, mask = model(x, 0.75)
        assert mask.sum().item() == 2 * int(0.75 * model.num_patches)  # MAE keeps int(L·(1−r)) visible
    elif family == "vit_cls":
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    else:
        out = model(x, torch.tensor([10.0, 500.0]), torch.tensor([3, 9]))
        assert out.shape[1] == (8 if family == "dit" else 4)  # DiT returns the sigma channels, SiT/LightningDiT not
        loss = out.square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if family in ("vit", "vit_cls", "vit_lightning"):  # something upstream learns (DiT blocks start gated off)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_full_size_layout_matches_snapshot(name):
    got = full_size_layout(name)
    entry = model_entry(name)
    size = SIZES[entry.size]
    assert got["num_params"] > 0
    block_key = "blocks.*.attn.qkv.weight"
    assert block_key in got["keys"]
    snapshot = json.loads(SNAPSHOT.read_text())
    assert name in snapshot, f"{name} is new: regenerate {SNAPSHOT} (see the module docstring)"
    want = snapshot[name]
    assert (got["key_hash"], got["num_params"]) == (want["key_hash"], want["num_params"]), (
        f"{name}: state-dict layout changed (keys now {got['keys']}); public checkpoints may no longer load")
    with torch.device("meta"):
        model = create_model(name, **FULL_SIZE_INPUT[entry.family])
    assert len(model.blocks) == size.depth


def write_snapshot() -> None:
    """Regenerate the snapshot (`python tests/test_registry.py`), after a deliberate layout change only."""
    SNAPSHOT.parent.mkdir(exist_ok=True)
    entries = {name: {k: v for k, v in full_size_layout(name).items() if k != "keys"} for name in NAMES}
    SNAPSHOT.write_text(json.dumps(entries, indent=1) + "\n")


def _same_size_mae(name: str) -> str | None:
    entry = model_entry(name)
    source_family = "vit_lightning" if entry.family == "lightningdit" else "vit"
    return next((n for n in list_models(source_family) if (model_entry(n).size, model_entry(n).patch_size)
                 == (entry.size, entry.patch_size)), None)


# Every downstream model that has a same-size pretraining model (DiT/SiT patch 8 has none: no MAE uses it).
TRANSFER_TARGETS = [n for n in list_models("vit_cls") + list_models("dit") + list_models("sit")
                    + list_models("lightningdit") if _same_size_mae(n)]


@pytest.mark.parametrize("name", TRANSFER_TARGETS)
def test_transfer_from_the_same_size_mae_covers_every_block(name):
    entry = model_entry(name)
    source_name = _same_size_mae(name)
    torch.manual_seed(0)
    source = tiny(source_name, depth=2).state_dict()
    target = tiny(name, depth=2, **({"affine_norms": True} if entry.family in ("dit", "sit") else {}))
    report = transfer_weights(source, target)
    loaded_blocks = {int(k.split(".")[1]) for k in report.loaded if k.startswith("blocks.")}
    assert loaded_blocks == {0, 1}
    state = target.state_dict()
    for block in range(2):
        mlp = ("mlp.w12.weight", "mlp.w3.weight") if entry.family == "lightningdit" else ("mlp.fc1.weight",
                                                                                         "mlp.fc2.weight")
        for part in ("attn.qkv.weight", "attn.proj.weight", *mlp, "norm1.weight", "norm2.weight"):
            key = f"blocks.{block}.{part}"
            assert key in report.loaded and torch.equal(state[key], source[key])


if __name__ == "__main__":
    write_snapshot()

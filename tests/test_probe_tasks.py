"""The understanding tasks end to end on tiny recipes: probe and classify over a latent cache and on the fly,
the flip honoured, the protocol written beside every result, and probes of DiT/SiT backbones."""

from __future__ import annotations

import json

import pytest
import torch

from usp.config import load_config
from usp.data.images import FashionMNISTDataset, build_transform
from usp.data.sampler import SeededDataset
from usp.latent.cache import build_cache
from usp.latent.vae import LatentSpace
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vae_dir):
    """A latent cache of 32 train / 16 test images, a 2-step USP pretraining, and common overrides."""
    root = tmp_path_factory.mktemp("understanding")
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    for split, limit in (("train", 32), ("test", 16)):
        dataset = FashionMNISTDataset(split=split, transform=build_transform(32, "center", hflip=False), limit=limit)
        build_cache(dataset, latent, 32, root / "cache", split, batch_size=16, progress=False)
    common = ["data.source=fashion_mnist", "data.image_size=32", "data.limit=32", "data.num_workers=0",
              "data.eval_split=test", "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"run.out_dir={root}",
              "train.global_batch=8", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
              "train.tensorboard=false", "train.progress=false", "optim.warmup_epochs=0", "model.name=vit_t_2",
              "model.num_classes=10"]
    config = load_config(None, [*common, "run.name=pre"])
    train(config, build_task(config), CPU, resume=None)
    return {"root": root, "cache": root / "cache", "weights": ckpt.latest_weights(config.run_dir / "checkpoints"),
            "common": common}


PROBE = ["run.task=probe", "model.global_pool=false", "optim.name=lars", "optim.blr=0.1", "optim.weight_decay=0"]
CLASSIFY = ["run.task=classify", "model.drop_path=0.1", "optim.layer_decay=0.75", "optim.blr=1e-3",
            "classify.mixup=0.8", "classify.cutmix=1.0", "classify.label_smoothing=0.1"]
TABLE13_AUG = ["classify.randaug=rand-m9-mstd0.5-inc1", "classify.random_erasing=0.25"]


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "on_the_fly"])
@pytest.mark.parametrize("task", ["probe", "classify"])
def test_probe_and_classify_train_and_write_their_protocol(setup, cached, task):
    extra = [f"latent.cache={setup['cache']}"] if cached else []
    if task == "classify" and not cached:
        extra += TABLE13_AUG  # the full Table 13 augmentation needs images
    config = load_config(None, [*setup["common"], *(PROBE if task == "probe" else CLASSIFY), *extra,
                                f"model.init={setup['weights']}", f"run.name={task}-{cached}"])
    built = build_task(config)
    frozen = {k: v.clone() for k, v in built.vit.state_dict().items() if not k.startswith("head")}
    result = train(config, built, CPU, resume=None)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result["history"])
    after = built.vit.state_dict()
    changed = [k for k in frozen if not torch.equal(frozen[k], after[k])]
    assert (changed == []) if task == "probe" else bool(changed)  # the probe leaves the encoder untouched
    card = json.loads((config.run_dir / "result.json").read_text())
    logged = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()][-1]["eval"]
    # The cache holds 16 test images; on the fly data.limit=32 applies to the test split too.
    assert (card["top1"], card["top5"]) == (logged["top1"], logged["top5"])
    assert card["eval_images"] == (16 if cached else 32)
    assert 0.0 <= card["top1"] <= card["top5"] <= 100.0
    protocol = card["protocol"]
    assert protocol["init"] == str(setup["weights"]) and protocol["train_images"] == 32
    if task == "probe":
        assert protocol["features"] == {"layer": "output of block 4 of 4 (last)", "pooling": "cls token",
                                        "norm": "after the final LayerNorm (norm)"}
        assert "LARS" in protocol["classifier"] and "× 4.004e+04" in protocol["schedule"]  # 1 281 167 / 32
    assert ("flip of the cached latent" in protocol["augmentation"]) == cached
    if task == "classify" and not cached:
        assert "RandAugment rand-m9-mstd0.5-inc1" in protocol["augmentation"]


def test_cached_probe_trains_on_features_computed_once_with_the_per_step_result(setup, monkeypatch):
    """With a cache the probe encodes each image and orientation once; the head then sees, step for step, the
    features the per-step probe computes from the same flip draws: equal weights (float rounding) and top-1."""
    import usp.train.tasks.classification as classification

    runs = {}
    for mode in ("features", "per_step"):
        if mode == "per_step":
            monkeypatch.setattr(classification, "probe_on_features", lambda config, data: False)
        config = load_config(None, [*setup["common"], *PROBE, f"latent.cache={setup['cache']}", "train.max_steps=8",
                                    f"model.init={setup['weights']}", f"run.name=probe-{mode}"])
        task = build_task(config)
        assert task.on_features == (mode == "features")
        train(config, task, CPU, resume=None)
        runs[mode] = (task, json.loads((config.run_dir / "result.json").read_text()),
                      load_weights(ckpt.latest_weights(config.run_dir / "checkpoints"))[0])
    (task, card, weights), (_, reference_card, reference_weights) = runs["features"], runs["per_step"]
    assert weights.keys() == reference_weights.keys()  # the weights file has the per-step probe's keys
    for key in weights:
        torch.testing.assert_close(weights[key], reference_weights[key], rtol=1e-4, atol=1e-5)
    assert card["top1"] == reference_card["top1"] and card["top5"] == reference_card["top5"]
    assert "features computed once" in card["protocol"]["augmentation"]
    # The stored features of item 3, plain and flipped, are the frozen encoder's on the cached latents.
    batch = {"moments": task.data.dataset[3]["moments"][None].repeat(2, 1, 1, 1, 1), "flip": torch.tensor([0, 1])}
    with torch.no_grad():
        expected = task.vit.eval().forward_features(task.data.latents(batch))  # (2, D)
    torch.testing.assert_close(torch.as_tensor(task.train_set[3]["features"]), expected, rtol=1e-5, atol=1e-5)


def _flips(task, seeds=range(64)) -> list[bool]:
    """Whether each seeded draw of item 0 comes out flipped (cache: the coin; on the fly: the image)."""
    data = SeededDataset(task.train_set, task.extras)
    if task.data.cached:
        return [bool(data[(0, seed)]["flip"]) for seed in seeds]
    plain = task.train_set.transform(task.train_set.load(0))
    return [not torch.equal(data[(0, seed)]["image"], plain) for seed in seeds]


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "on_the_fly"])
@pytest.mark.parametrize("task", ["probe", "classify", "pretrain", "finetune"])
def test_hflip_false_never_draws_a_flipped_sample(setup, cached, task):
    extra = [f"latent.cache={setup['cache']}"] if cached else ["data.crop=center"]  # centre: flip is the only draw
    names = {"probe": PROBE, "classify": ["run.task=classify"], "pretrain": ["run.task=pretrain"],
             "finetune": ["run.task=finetune", "model.name=dit_t_2"]}[task]
    draws = {}
    for hflip in (True, False):
        config = load_config(None, [*setup["common"], *names, *extra, f"data.hflip={str(hflip).lower()}",
                                    f"run.name=flip-{task}-{cached}-{hflip}"])
        draws[hflip] = _flips(build_task(config))
    assert not any(draws[False])
    assert 10 < sum(draws[True]) < 54  # the control: with the flip on, about half of 64 draws are flipped


def test_classify_from_cache_refuses_image_augmentation(setup):
    config = load_config(None, [*setup["common"], *CLASSIFY, *TABLE13_AUG, f"latent.cache={setup['cache']}",
                                "run.name=refused"])
    with pytest.raises(ValueError, match="unset latent.cache"):
        build_task(config)


# --------------------------------------------------------------------------------------------
# Probes of diffusion backbones
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(setup):
    """A 2-step DiT fine-tuned from the tiny USP checkpoint, on the cache."""
    config = load_config(None, [*setup["common"], "run.task=finetune", "model.name=dit_t_2",
                                f"model.init={setup['weights']}", f"latent.cache={setup['cache']}", "run.name=dit",
                                "generation.grid_classes=2", "generation.grid_per_class=1",
                                "generation.sampler=ddim", "generation.sample_steps=ddim2"])
    train(config, build_task(config), CPU, resume=None)
    return ckpt.latest_weights(config.run_dir / "checkpoints")


def test_backbone_features_are_the_blocks_outputs_under_the_null_label(generator):
    """The probe's features equal the mean of what each block returns inside the model's own forward, called
    with the null label and the mapped time; the label embedding does not leak: any label gives other features."""
    from usp.diffusion import build_objective
    from usp.evaluate.backbone_probe import backbone_features
    from usp.sample.run import load_generator

    model, config = load_generator(generator)
    ddpm = build_objective(config.generation)
    assert ddpm.model_time(0.0) == 0.0 and ddpm.model_time(1.0) == 999.0  # DDPM: t = 0 is data
    sit = build_objective(load_config(None, ["generation.method=transport", "generation.sampler=ode"]).generation)
    assert sit.model_time(0.0) == 1.0 and sit.model_time(0.25) == 0.75  # transport: t = 1 is data
    torch.manual_seed(0)
    x, noise = torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 8)
    x_t, t = ddpm.noised(x, noise, 0.5)
    assert t.tolist() == [500, 500, 500]  # round(0.5 · 999)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.mean(dim=1))) for b in model.blocks]
    with torch.no_grad():
        model(x_t, t, torch.full((3,), model.null_label))
        for hook in hooks:
            hook.remove()
        features = backbone_features(model, x_t, t, [2, 4])
        torch.testing.assert_close(features[2], outputs[1])
        torch.testing.assert_close(features[4], outputs[3])
        labelled = []
        hooks = [model.blocks[3].register_forward_hook(lambda m, i, o: labelled.append(o.mean(dim=1)))]
        model(x_t, t, torch.zeros(3, dtype=torch.long))
        hooks[0].remove()
    assert not torch.allclose(labelled[0], features[4])
    with pytest.raises(ValueError, match="blocks must lie in 1..4"):
        backbone_features(model, x_t, t, [5])


def test_usp_probe_backbone_on_a_dit_checkpoint(generator, capsys, tmp_path):
    from usp.cli import main

    out = tmp_path / "backbone.json"
    main(["probe-backbone", str(generator), "--blocks", "1", "3", "--noise-levels", "0", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["block"], r["noise_level"]) for r in result["rows"]] == [(1, 0.0), (1, 0.5), (3, 0.0), (3, 0.5)]
    assert all(0.0 <= r["logistic_top1"] <= 100.0 and 0.0 <= r["knn_top1"] <= 100.0 for r in result["rows"])
    assert result["protocol"]["features"]["pooling"] == "mean of all tokens"
    assert result["protocol"]["features"]["label"] == "null (CFG-unconditional) label"
    assert result["protocol"]["train_images"] == 32
    assert "| 3 | 0.5 | 500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["probe-backbone", str(generator), "--noise-levels", "1.5"])
    # The run folder (its latest weights), as the help promises, probes the same file.
    from_folder = tmp_path / "from_folder.json"
    main(["probe-backbone", str(generator.parent.parent), "--blocks", "1", "3", "--noise-levels", "0", "0.5",
          "--out", str(from_folder)])
    assert json.loads(from_folder.read_text())["rows"] == result["rows"]


def test_usp_probe_of_a_weights_file_names_the_backbone_command(generator, capsys):
    from usp.cli import main

    with pytest.raises(SystemExit):
        main(["probe", str(generator), "--dry-run"])
    assert "usp probe-backbone WEIGHTS" in capsys.readouterr().err

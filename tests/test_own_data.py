"""Your own images, end to end: a small ImageFolder tree of real images (Fashion-MNIST written as 32-px PNGs, one
corrupt file, one empty class) through `usp init`, `usp demo --data --quick`, `usp reference` + `usp evaluate`;
recipe paths that resolve from any directory (run.root) and weights given as a run folder; options and overrides
in any order; recipes by name; `usp list`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from usp.cli import main
from usp.config import load_config, read_recipe
from usp.data.fashion_mnist import find_folder, load_fashion_mnist
from usp.data.scan import scan_image_folder
from usp.run.weights import load_weights, resolve_weights

CLASSES = 4  # classes with images; a fifth, empty class folder is added to every split
TRAIN_PER_CLASS, VAL_PER_CLASS = 60, 15

needs_fmnist = pytest.mark.skipif(find_folder() is None, reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/{train,val}/{class0..class3,zz_empty}/*.png: 300 Fashion-MNIST images padded to 32 px, plus one corrupt
    PNG in train/class1 (the empty class sorts last, so the image classes keep labels 0-3)."""
    root = tmp_path_factory.mktemp("own") / "mydata"
    images, labels = load_fashion_mnist(None, "test")
    for split, start, count in (("train", 0, TRAIN_PER_CLASS), ("val", TRAIN_PER_CLASS, VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[start : start + count]:
                Image.fromarray(np.pad(images[i], 2)).save(folder / f"{i:05d}.png")
        (root / split / "zz_empty").mkdir()
    (root / "train" / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@needs_fmnist
def test_scan_names_the_corrupt_file_and_the_empty_class(tree):
    scan = scan_image_folder(tree)
    assert [p.name for p, _ in scan.bad_files] == ["broken.png"]
    assert scan.empty_classes == ["train/zz_empty", "val/zz_empty"]
    assert scan.splits["train"].images == CLASSES * TRAIN_PER_CLASS and scan.eval_split == "val"
    assert scan.classes == [*(f"class{c}" for c in range(CLASSES)), "zz_empty"]


def test_scan_refuses_splits_whose_class_folders_differ(tmp_path):
    for split, names in (("train", ("a", "b")), ("val", ("a",))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    with pytest.raises(ValueError, match="create the missing"):
        scan_image_folder(tmp_path)


@needs_fmnist
@pytest.mark.slow
def test_init_then_demo_quick_on_own_images(tree, tmp_path, capsys):
    out = tmp_path / "recipes_out"
    main(["init", "--data", str(tree), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "broken.png" in printed and "zz_empty" in printed
    assert {p.stem: read_recipe(p)["run"]["root"] for p in (out / "recipes").glob("*.yaml")} == dict.fromkeys(
        ("vae", "pretrain", "probe", "classify", "dit_usp", "dit_scratch", "sit_usp", "sit_scratch"), "..")
    recipes = {p.stem: load_config(p) for p in (out / "recipes").glob("*.yaml")}  # base: merged, paths resolved
    for name in ("probe", "classify", "dit_usp", "dit_scratch", "sit_usp", "sit_scratch"):
        assert recipes[name].model.num_classes == CLASSES + 1, name  # every class folder is a label
    for name, recipe in recipes.items():
        assert recipe.data.source == "folder" and Path(recipe.data.root) == tree.resolve(), name
        assert recipe.data.exclude, name  # the corrupt file is left out through the list, by name
    assert "broken.png" in Path(recipes["pretrain"].data.exclude).read_text()
    assert recipes["dit_usp"].model.init == str((out / "runs" / "pretrain").resolve())
    assert recipes["dit_scratch"].model.init is None
    assert recipes["vae"].data.hflip is False and recipes["pretrain"].data.hflip is True

    demo = tmp_path / "demo"
    main(["demo", "--data", str(tree), "--quick", "--out", str(demo)])
    report = (demo / "report.md").read_text()
    assert "broken.png" in report and "zz_empty" in report and "mydata" in report
    # Built from this data, not patched from the Fashion-MNIST text: its classes, its evaluation split.
    assert "Fashion-MNIST" not in report and "(chance 0.20)" in report and "all 60 images of the val split" in report
    results = json.loads((demo / "results.json").read_text())
    assert {k: results["cache"][k] for k in ("train", "test")} == {"train": CLASSES * TRAIN_PER_CLASS,
                                                                    "test": CLASSES * VAL_PER_CLASS}
    for name in ("sit_usp_s0", "sit_scratch_s0", "sit_scratch_s1"):  # the demo's arms
        assert results[name]["evals"] and all(math.isfinite(e["domain_fd"]) for e in results[name]["evals"])
    # The reference batch is the evaluation split, without the bad file: 60 images at the training size.
    with np.load(demo / "domain_reference.npz") as ref:
        assert ref["arr_0"].shape == (CLASSES * VAL_PER_CLASS, 32, 32, 3)
    assert 0 <= results["probe"]["usp"]["fast"]["logistic_top1"] <= 100
    assert 0 <= results["probe"]["usp"]["paper"]["top1"] <= 100


@needs_fmnist
def test_recipe_paths_resolve_from_another_directory(tree, tmp_path, monkeypatch):
    out = tmp_path / "proj"
    main(["init", "--data", str(tree), "--out", str(out), "--no-flip"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(out / "recipes" / "dit_usp.yaml")
    assert Path(config.run.out_dir) == (out / "runs").resolve()
    assert Path(config.latent.cache) == (out / "latents").resolve()
    assert Path(config.latent.path) == (out / "vae").resolve()
    assert Path(config.model.init) == (out / "runs" / "pretrain").resolve()
    assert config.data.hflip is False
    # An override on the command line is relative to where it is typed, not to the recipe.
    assert load_config(out / "recipes" / "dit_usp.yaml", ["latent.cache=here"]).latent.cache == "here"
    # model.init names the pretraining run folder: its highest-step weights are loaded, from here too.
    checkpoints = out / "runs" / "pretrain" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (90, 1200, 300):  # "latest" is by step in the name, not by write order
        save_file({"w": torch.full((2,), float(step))}, str(checkpoints / f"weights_{step:07d}.safetensors"))
    assert load_weights(config.model.init)[0]["w"].tolist() == [1200.0, 1200.0]
    assert resolve_weights(Path(config.model.init) / "latest").name == "weights_0001200.safetensors"
    assert resolve_weights(checkpoints / "weights_0000090.safetensors").name == "weights_0000090.safetensors"
    (out / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="looked for weights_<step>.safetensors in .*vae/checkpoints"):
        resolve_weights(out / "vae")


def test_fmnist_recipes_name_the_pretraining_run_folder():
    for name in ("probe", "dit_usp", "sit_usp"):
        assert load_config(f"fmnist/{name}").model.init == "runs/fmnist-pretrain", name


def test_options_and_overrides_in_any_order(capsys):
    main(["cache-latents", "fmnist/pretrain", "--splits", "train", "test", "data.limit=7", "--dry-run"])
    out = capsys.readouterr().out
    plan = json.loads(out[: out.index("}\n") + 1])
    assert plan["splits"] == ["train", "test"] and plan["overrides"] == ["data.limit=7"]
    assert yaml.safe_load(out[out.index("}\n") + 2 :])["data"]["limit"] == 7
    main(["pretrain", "fmnist/pretrain", "--resume", "none", "train.max_steps=7", "optim.blr=0.01", "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7 and printed["optim"]["blr"] == 0.01
    main(["probe", "train.max_steps=3", "fmnist/probe", "--fast", "data.limit=9", "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["data"]["limit"] == 9
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "models", "train.max_steps=3"])
    assert exit_info.value.code == 2 and "takes no key=value overrides" in capsys.readouterr().err


def test_a_recipe_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["pretrain", "fmnist/pretrain", "--dry-run"])
    assert yaml.safe_load(capsys.readouterr().out) == load_config("fmnist/pretrain").to_dict()
    with pytest.raises(SystemExit):
        main(["pretrain", "fmnist/nope", "--dry-run"])
    assert "usp list recipes" in capsys.readouterr().err


def test_list_names_models_latent_spaces_and_recipes(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "vit_b_2 " in out and "dit_xl_2 " in out and "small-f4" in out and "0.18215" in out
    assert "fmnist/pretrain" in out and "finetune/dit_xl_2_usp_256" in out


def test_evaluate_checks_both_paths_before_loading_inception(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit):
        main(["evaluate", str(ref), str(tmp_path / "missing.npz"), "--inception-weights", "/nonexistent.pth"])
    err = capsys.readouterr().err
    assert "samples batch" in err and "missing.npz" in err and "Inception" not in err


@needs_fmnist
@pytest.mark.slow
def test_reference_of_the_tree_evaluates_against_itself_with_fid_zero(tree, tmp_path, capsys):
    from usp.evaluate import save_random_weights

    torch.set_num_threads(1)  # Inception at 299² on a shared 2-core CPU: one thread is fastest (test_evaluate_e2e)
    ref = tmp_path / "ref.npz"
    main(["reference", str(tree / "val"), "--out", str(ref), "--image-size", "32"])
    with np.load(ref) as data:
        assert data["arr_0"].shape == (CLASSES * VAL_PER_CLASS, 32, 32, 3)
    weights = save_random_weights(tmp_path / "inception.pth")
    metrics = tmp_path / "metrics.json"
    main(["evaluate", str(ref), str(ref), "--inception-weights", str(weights), "--device", "cpu",
          "--out", str(metrics)])
    result = json.loads(metrics.read_text())
    print(f"FID of the reference against itself: {result['fid']:.3g}, sFID {result['sfid']:.3g}")
    assert abs(result["fid"]) < 1e-2 and abs(result["sfid"]) < 1e-2


@needs_fmnist
def test_reference_lists_the_corrupt_file_it_leaves_out(tree, tmp_path, capsys):
    main(["reference", str(tree / "train"), "--out", str(tmp_path / "train.npz"), "--image-size", "32"])
    assert "broken.png" in capsys.readouterr().err
    with np.load(tmp_path / "train.npz") as data:
        assert len(data["arr_0"]) == CLASSES * TRAIN_PER_CLASS


def test_fetch_lists_hub_and_local_assets():
    from usp.recipe_tools.fetch import assets

    found = assets(["pretrain/vit_b_2_sdvae_224", "finetune/dit_xl_2_usp_256", "fmnist/pretrain"])
    assert ("hub", "stabilityai/sd-vae-ft-ema") in found and ("local", "runs/fmnist-vae/vae") in found
    assert len(found) == len(set(found))


def test_offline_vae_error_names_the_asset_and_the_local_path_key(tmp_path, monkeypatch):
    from usp.latent.vae import LatentSpace

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    with pytest.raises(FileNotFoundError, match=r"'nobody/no-such-vae'.*usp fetch.*latent\.path"):
        LatentSpace.load("sd-vae-ft-ema", "nobody/no-such-vae")


def test_reconstruct_picks_images_across_classes():
    from usp.evaluate.reconstruct import across_classes

    class Folder:  # ImageFolderDataset's shape: samples sorted by class, 5 + 2 + 3 items
        samples = [("a", 0)] * 5 + [("b", 1)] * 2 + [("c", 2)] * 3

        def __len__(self) -> int:
            return len(self.samples)

    picked = across_classes(Folder(), 7)
    assert [Folder.samples[i][1] for i in picked] == [0, 1, 2, 0, 1, 2, 0] and len(set(picked)) == 7


def test_no_flip_also_holds_for_cached_latents():
    from usp.latent.data import LatentData

    data = LatentData.__new__(LatentData)  # only the flip coin is exercised: a cached dataset, no posterior noise
    data.vae, data.augment, data.sample_posterior = None, True, False
    data.flip = False  # an augmented split with data.hflip=false
    assert not any(bool(data.extras()["flip"]) for _ in range(64))
    data.flip = True
    assert any(bool(data.extras()["flip"]) for _ in range(64))


def test_every_training_run_writes_its_loss_curve_beside_its_log(fmnist_overrides):
    from usp.train.engine import train
    from usp.train.tasks import build_task

    config = load_config(None, fmnist_overrides)
    train(config, build_task(config), resume="auto")
    with Image.open(config.run_dir / "loss.png") as image:
        image.load()
        assert image.size[0] > 100 and (config.run_dir / "log.jsonl").is_file()


@needs_fmnist
def test_latent_space_follows_the_resolution(tree, tmp_path):
    from usp.recipe_tools.init import init_recipes

    for size, space, model, has_vae in ((64, "small-f4", "dit_t_2", True), (128, "sd-vae-ft-ema", "dit_b_2", False)):
        _, plan, files = init_recipes(tree, tmp_path / str(size), image_size=size)
        assert ("vae" in {f.stem for f in files}) is has_vae
        config = load_config(tmp_path / str(size) / "recipes" / "dit_usp.yaml")  # every written recipe validates
        assert (config.latent.space, config.model.name, config.data.image_size) == (space, model, size)
        if not has_vae:
            assert config.latent.path == "stabilityai/sd-vae-ft-ema"  # a hub id is not taken for a path


def _brightness_classes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) images in [-1, 1] whose mean brightness is their class (-0.6, 0, 0.6), plus noise."""
    labels = torch.arange(3).repeat(count // 3)
    noise = 0.1 * torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (labels.float() - 1).mul(0.6).view(-1, 1, 1, 1) + noise, labels


def test_the_domain_trainer_learns_its_classes_and_records_them(tmp_path):
    from usp.evaluate.domain import DomainEvaluator, train_domain_cnn

    (x, y), (test_x, test_y) = _brightness_classes(120, 0), _brightness_classes(30, 1)
    path = tmp_path / "domain.safetensors"
    _, accuracy = train_domain_cnn(x, y, test_x, test_y, path, steps=30, num_classes=3, batch_size=32)
    evaluator = DomainEvaluator.load(path)  # builds a 3-class head from the metadata
    assert accuracy == 1.0 and (evaluator.predict(test_x) == test_y.numpy()).all()
    assert (evaluator.metadata["num_classes"], evaluator.metadata["epochs"]) == ("3", "10")  # 30 steps of 3 per epoch


def test_the_fashion_mnist_classifier_is_the_same_trainer_in_epochs(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import usp.evaluate.domain as domain

    (x, y), (test_x, test_y) = _brightness_classes(300, 0), _brightness_classes(30, 1)
    splits = {"train": (x, y), "test": (test_x, test_y)}
    # Fashion-MNIST stand-in: the loader's uint8 (N, 28, 28) is replaced by ready (N, 3, 32, 32) tensors.
    monkeypatch.setattr(domain, "load_fashion_mnist", lambda root, split: (splits[split][0], splits[split][1].numpy()))
    monkeypatch.setattr(domain, "to_rgb32", lambda images: images)
    domain.train_domain_classifier(tmp_path / "a.safetensors", epochs=2, seed=3, batch_size=64)
    domain.train_domain_cnn(x, y, test_x, test_y, tmp_path / "b.safetensors", steps=2 * (300 // 64), seed=3,
                            batch_size=64)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

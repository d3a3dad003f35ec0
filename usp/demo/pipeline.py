"""`usp demo`: the whole method on Fashion-MNIST on one CPU, with the recipes a user runs on ImageNet.

Stages (each skipped when its result file exists, so an interrupted demo resumes):
  vae       train the small f4 VAE (its test PSNR)            usp train-vae configs/fmnist/vae.yaml
  cache     latent moments of train/test (+ flips)            usp cache-latents ...
  domain    the domain classifier for FD / class agreement    (not Inception FID)
  pretrain  USP masked latent modeling + restoration grid      usp pretrain configs/fmnist/pretrain.yaml
  <arm>     generators from USP and from scratch, same recipe, sampled and scored at checkpoints:
            embedded default: SiT from USP and from scratch at the run's seed, a scratch run with only the init
            seed changed (the paired noise band) and a second scratch seed (the unpaired spread);
            --full: DiT and SiT, both arms, two seeds
  probe     the paper's linear probe and the fast read-out: USP vs random init (and raw pixels)
  report    report.md with tables, curves and grids

Modes: the embedded default (`usp demo`, about 12 minutes on 2 CPU cores), `--full` (the reproduction, about an
hour: longer pretraining, DiT and SiT, 1 000 steps, two seeds), and `--quick` (tiny budgets: checks the
plumbing of either mode in about a minute; its numbers mean nothing).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usp.config import Config, load_config, recipes_dir

CONFIGS = recipes_dir() / "fmnist"  # the source tree's configs/, or the copy an installed wheel ships


@dataclass(frozen=True)
class Budget:
    """What one demo mode spends. Costs measured on 2 CPU cores (idle machine) are in docs/demo/README.md."""

    images: int  # train images (of 60 000) cached and used by every latent stage
    test_images: int | None  # test images cached (None: all 10 000)
    vae_steps: int
    domain_epochs: int
    pretrain_steps: int  # at constant lr after a short warm-up (configs/fmnist/pretrain.yaml)
    finetune_steps: int
    eval_every: int
    eval_samples: int  # class-balanced samples per evaluation (the FD's sample size)
    probe_train: int
    families: tuple[str, ...]  # generators: "sit", "dit"
    usp_seeds: int  # seeds (run seed, +1, ...) of the USP arm; the scratch arm always runs two (the noise band)
    # One more scratch run at the USP arm's run seed with only the initial weights' seed changed: the paired
    # noise band (what a random init alone moves FD and loss by, with data order, noise and samples held).
    init_control: bool = False


BUDGETS: dict[str, Budget] = {
    # The embedded default: 15 minutes on 2 CPU cores including set-up (~1.5 min) and imports. Idle-machine costs
    # behind it (docs/demo/README.md): VAE ~0.2 s/step, cache ~0.4 ms/image, domain classifier ~8 s/epoch,
    # pretraining ~0.21 s/step (batch 256), SiT ~0.11 s/step (batch 128) + ~20 s per 1 000 evaluation samples.
    # Spent where the method shows: 1 200 constant-lr pretraining steps (15 epochs of 20 000 images: the probe gap
    # and the SiT gain grow with it, 600 steps left seed 1 inside the band), 400 SiT steps (samples recognisable) in
    # four runs (USP; scratch; scratch with only the init seed changed, the paired band; scratch at a second seed,
    # the unpaired spread), one 2 000-sample evaluation each (FD bootstrap error ~1.2; at 1 000 samples it was ~2.1,
    # and twice the combined error, 6, was the band that decided seed 1). DiT is in --full.
    "default": Budget(images=20000, test_images=None, vae_steps=150, domain_epochs=2, pretrain_steps=1200,
                      finetune_steps=400, eval_every=400, eval_samples=2000, probe_train=10000,
                      families=("sit",), usp_seeds=1, init_control=True),
    # The reproduction (`--full`): the issue-15 protocol, about 70 minutes on 2 CPU cores: 2 000 pretraining
    # steps (17 epochs of 30 000 images), DiT and SiT from USP and from scratch at two seeds, 1 000 steps each,
    # evaluated every 250 steps with 1 000 samples.
    "full": Budget(images=30000, test_images=None, vae_steps=200, domain_epochs=2, pretrain_steps=2000,
                   finetune_steps=1000, eval_every=250, eval_samples=1000, probe_train=30000,
                   families=("dit", "sit"), usp_seeds=2),
    # Plumbing checks (tests/test_demo.py): every stage and report path, numbers meaningless.
    "quick": Budget(images=2000, test_images=500, vae_steps=15, domain_epochs=1, pretrain_steps=10,
                    finetune_steps=8, eval_every=4, eval_samples=50, probe_train=500, families=("sit",),
                    usp_seeds=1, init_control=True),
    "full-quick": Budget(images=2000, test_images=500, vae_steps=15, domain_epochs=1, pretrain_steps=10,
                         finetune_steps=8, eval_every=4, eval_samples=50, probe_train=500, families=("dit", "sit"),
                         usp_seeds=2),
}


@dataclass(frozen=True)
class Arm:
    """One generator run: family (dit/sit), init (usp/scratch), training seed, and the seed of the initial
    weights when it differs from the training seed (the init-only control)."""

    family: str
    init: str
    seed: int
    init_seed: int | None = None

    @property
    def key(self) -> str:
        return f"{self.family}_{self.init}_s{self.seed}" + ("" if self.init_seed is None else f"_w{self.init_seed}")


def arms(budget: Budget, seed: int) -> list[Arm]:
    """USP arms first (they need the pretraining), then scratch at two seeds: the second scratch seed differs
    from the first only by chance, so their distance is the unpaired noise band. With `init_control`, a scratch
    run at the first seed whose initial weights alone are drawn from another seed (10⁴ + seed): it differs from the
    paired scratch run exactly as the USP arm does (init only), so their distance is the paired noise band."""
    out = []
    for family in budget.families:
        out += [Arm(family, "usp", seed + k) for k in range(budget.usp_seeds)]
        out += [Arm(family, "scratch", seed + k) for k in range(2)]
        if budget.init_control:
            out.append(Arm(family, "scratch", seed, init_seed=10**4 + seed))
    return out


class Demo:
    def __init__(self, out: Path, quick: bool, seed: int, full: bool = False):
        self.out, self.quick, self.seed, self.full = out, quick, seed, full
        self.mode = {(False, False): "default", (False, True): "quick", (True, False): "full",
                     (True, True): "full-quick"}[(full, quick)]
        self.spend = BUDGETS[self.mode]
        self.runs, self.latents = out / "runs", out / "latents"
        self.stage_dir = out / "stages"
        self.stage_dir.mkdir(parents=True, exist_ok=True)

    def budget(self, key: str):
        return getattr(self.spend, key)

    def recipe(self, name: str, *overrides: str) -> Config:
        common = [f"run.out_dir={self.runs}", f"run.seed={self.seed}", "train.progress=false",
                  "train.tensorboard=false", "data.num_workers=0"]
        return load_config(CONFIGS / f"{name}.yaml", [*common, *overrides])

    def stage(self, name: str, fn) -> dict:
        """Run `fn` unless its result exists; record the wall time."""
        path = self.stage_dir / f"{name}.json"
        if path.exists():
            print(f"[demo] {name}: done earlier, skipped")
            return json.loads(path.read_text())
        print(f"[demo] {name} ...", flush=True)
        start, load = time.perf_counter(), os.getloadavg()[0]
        result = fn()
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # 1-min load average at start and end
        path.write_text(json.dumps(result, indent=1))
        print(f"[demo] {name}: {result['seconds']} s", flush=True)
        return result

    # ---- stages -------------------------------------------------------------------------------

    def vae(self) -> dict:
        from usp.train.engine import train
        from usp.train.tasks import build_task

        config = self.recipe("vae", f"train.max_steps={self.budget('vae_steps')}", f"vae.out={self.vae_dir}",
                             *self.limit())
        train(config, build_task(config), resume="auto")
        stats = json.loads((self.vae_dir / "latent_stats.json").read_text())
        return {"psnr_test": stats["psnr_test"], "scale": stats["scale"], "steps": config.train.max_steps}

    @property
    def vae_dir(self) -> Path:
        return self.out / "vae"

    def limit(self) -> list[str]:
        images = self.budget("images")
        return [f"data.limit={images}"] if images else []

    def latent_overrides(self) -> list[str]:
        return [f"latent.path={self.vae_dir}", f"latent.cache={self.latents}", *self.limit()]

    def cache(self) -> dict:
        """`usp cache-latents` of the pretraining recipe: the train split (the budget's images), the test split
        (its test images)."""
        from usp.latent.cache import cache_recipe

        counts = {}
        for split, budget in (("train", "images"), ("test", "test_images")):
            config = self.recipe("pretrain", *self.latent_overrides(), f"data.limit={self.budget(budget) or 'null'}")
            counts[split] = cache_recipe(config, [split], batch_size=500, progress=False)[split]["images"]
        return counts

    def domain(self) -> dict:
        from usp.evaluate.domain import train_domain_classifier

        _, accuracy = train_domain_classifier(self.out / "domain.safetensors", epochs=self.budget("domain_epochs"),
                                              seed=self.seed, limit=5000 if self.quick else None)
        return {"test_accuracy": accuracy}

    @property
    def domain_reference(self) -> Path:
        """The real side of the domain FD: every Fashion-MNIST test image, as an ADM-format NPZ (written once)."""
        path = self.out / "domain_reference.npz"
        if not path.exists():
            write_domain_reference(path)
        return path

    reference_text = "the 10 000 Fashion-MNIST test images"  # the real side of the domain FD, in the report

    def pretrain(self) -> dict:
        from usp.evaluate.reconstruct import reconstruct_grid
        from usp.run.checkpoint import latest_weights
        from usp.train.engine import read_log, train
        from usp.train.tasks import build_task

        config = self.recipe("pretrain", *self.latent_overrides(), f"train.max_steps={self.budget('pretrain_steps')}")
        train(config, build_task(config), resume="auto")
        weights = latest_weights(config.run_dir / "checkpoints")
        reconstruct_grid(weights, self.out / "restoration.png", num_images=10,
                         overrides=[f"latent.path={self.vae_dir}"])
        history, _ = read_log(config.run_dir)
        return {"weights": str(weights), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
                "steps": config.train.max_steps, "lr": config.lr, "schedule": config.optim.schedule,
                "run_dir": str(config.run_dir)}

    def generate(self, arm: Arm, usp_weights: str) -> dict:
        from usp.train.engine import read_log, train
        from usp.train.tasks import build_task

        overrides = [*self.latent_overrides(), f"train.max_steps={self.budget('finetune_steps')}",
                     f"train.eval_every={self.budget('eval_every')}",
                     f"generation.eval_samples={self.budget('eval_samples')}",
                     f"generation.domain_classifier={self.out / 'domain.safetensors'}",
                     f"generation.domain_reference={self.domain_reference}",
                     f"run.seed={arm.seed}", f"run.name=fmnist-{arm.key.replace('_', '-')}"]
        if arm.init_seed is not None:
            overrides.append(f"model.init_seed={arm.init_seed}")
        if arm.init == "usp":
            overrides.append(f"model.init={usp_weights}")
        config = self.recipe(f"{arm.family}_{arm.init}", *overrides)
        train(config, build_task(config), resume="auto")
        _, evals = read_log(config.run_dir)
        gen = config.generation
        protocol = {"model": f"{config.model.name}, EMA {config.train.ema_decay}", "method": gen.method,
                    "sampler": f"{gen.sampler} {gen.sample_steps} steps" + (f" ({gen.ode_method})"
                                                                           if gen.sampler == "ode" else ""),
                    "cfg_scale": gen.cfg_scale, "samples": gen.eval_samples, "sample_seed": arm.seed + 10**7,
                    "reference": self.reference_text, "lr": config.lr,
                    "batch": config.train.global_batch}
        return {"run_dir": str(config.run_dir), "evals": evals, "final": evals[-1] if evals else {},
                "arm": {"family": arm.family, "init": arm.init, "seed": arm.seed, "init_seed": arm.init_seed},
                "protocol": protocol}

    def probe(self, usp_weights: str) -> dict:
        """The paper's linear probe (LARS, BN + linear on the frozen cls token) and the fast read-out (logistic
        regression, k-NN) of the USP encoder and of the same encoder at random init; logistic on raw pixels."""
        from usp.train.engine import train
        from usp.train.tasks import build_task
        from usp.train.tasks.classification import fast_probe

        limit = self.budget("probe_train")
        # 5 epochs of the probe recipe (LARS travel ~12, see usp.train.optim.LARS) at batch 256: the cost is the
        # 50 k encoder passes whatever the batch, and 195 smaller steps converge further than 45 (on these frozen
        # features, 68.9 % vs 66.2 %; 10 epochs reach 72.6 %, logistic regression 72.9 %). Quick: runs, no more.
        # The budget is the demo's own, so the probe's floor on steps (PROBE_MIN_STEPS, for users' small trees) is off.
        epochs, batch = (1, 128) if self.quick else (5, 256)
        results = {}
        for name, init in (("usp", usp_weights), ("random_init", None)):
            config = self.recipe("probe", *self.latent_overrides(), *([f"data.limit={limit}"] if limit else []),
                                 f"model.init={init if init else 'null'}", f"run.name=probe-{name}",
                                 f"train.epochs={epochs}", f"train.global_batch={batch}", "train.min_steps=0")
            start = time.perf_counter()
            train(config, build_task(config), resume="auto")
            paper = json.loads((config.run_dir / "result.json").read_text())
            paper["seconds"] = time.perf_counter() - start
            results[name] = {"paper": paper, "fast": fast_probe(config)}
        results["raw_pixels"] = {"fast": self.raw_pixel_probe(limit)}
        return results

    def raw_pixel_probe(self, limit: int | None) -> dict:
        return raw_pixel_probe(limit)

    def check_data(self) -> None:
        from usp.data.fashion_mnist import find_folder

        if find_folder() is None:
            raise FileNotFoundError("Fashion-MNIST not found: `apt-get install dataset-fashion-mnist` (or run "
                                    "`bash scripts/setup.sh`), or set USP_FASHION_MNIST to a folder with its IDX files")

    trains_vae = True  # the small f4 VAE is trained here (else the recipes name a pretrained one)

    def report_data(self):
        """What the report says about the data (`usp.demo.report.ReportData`)."""
        from usp.demo.report import ReportData

        return ReportData()

    def run(self) -> Path:
        from usp.demo.report import write_report

        self.check_data()
        no_vae = {"psnr_test": math.nan, "scale": None, "steps": 0, "seconds": 0.0}
        results = {"vae": self.stage("vae", self.vae) if self.trains_vae else no_vae}
        results["cache"] = self.stage("cache", self.cache)
        results["domain"] = self.stage("domain", self.domain)
        results["pretrain"] = self.stage("pretrain", self.pretrain)
        weights = results["pretrain"]["weights"]
        for arm in arms(self.spend, self.seed):
            results[arm.key] = self.stage(arm.key, lambda arm=arm: self.generate(arm, weights))
        results["probe"] = self.stage("probe", lambda: self.probe(weights))
        return write_report(self.out, results, mode=self.mode, seed=self.seed, data=self.report_data())


def write_domain_reference(path: Path) -> Path:
    """The real side of the domain FD: every Fashion-MNIST test image, padded to 32 px as the data path does, as an
    ADM-format NPZ."""
    from usp.data.fashion_mnist import load_fashion_mnist
    from usp.evaluate.reference import write_sample_npz

    images = load_fashion_mnist(None, "test")[0]  # (N, 28, 28) uint8
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2)))
    write_sample_npz(path, np.repeat(padded[..., None], 3, axis=-1))
    return path


def raw_pixel_probe(limit: int | None) -> dict:
    """Logistic regression on the raw pixels of the first `limit` Fashion-MNIST training images (all when None),
    scored on the test split: the floor a useful encoder must clear."""
    from usp.data.fashion_mnist import load_fashion_mnist
    from usp.evaluate.probes import fast_protocol, logistic_regression

    train_x, train_y = load_fashion_mnist(None, "train")
    test_x, test_y = load_fashion_mnist(None, "test")
    start = time.perf_counter()
    raw = logistic_regression(_pixels(train_x[:limit]), torch.tensor(train_y[:limit]), _pixels(test_x),
                              torch.tensor(test_y))
    features = {"layer": "none", "pooling": "none", "norm": "raw 28×28 pixels, standardised"}
    return {"logistic_top1": raw["top1"], "seconds": time.perf_counter() - start,
            "protocol": fast_protocol(features, limit, None)}


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, H·W) float32, copied (the IDX arrays are read-only memory maps)."""
    return torch.tensor(images.reshape(len(images), -1), dtype=torch.float32)


def run_demo(out: str | Path = "demo_out", quick: bool = False, seed: int = 0, full: bool = False,
             data: str | Path | None = None, image_size: int | None = None, flip: bool = True) -> Path:
    """Run the demo into `out` -> the report's path: on Fashion-MNIST (with `full`, the reproduction), or with
    `data` on that ImageFolder tree (`usp demo --data`: its recipes as `usp init` writes them, with `image_size`
    and `flip`)."""
    if data is None:
        return Demo(Path(out), quick, seed, full).run()
    from usp.demo.own_data import OwnDataDemo

    return OwnDataDemo(data, Path(out), quick, seed, image_size, flip).run()


def demo_command(out: str = "demo_out", quick: bool = False, seed: int = 0, full: bool = False,
                 data: str | None = None, image_size: int | None = None, flip: bool = True) -> None:
    """`usp demo`: `run_demo`, then where its report is."""
    print(f"report: {run_demo(out, quick, seed, full, data, image_size, flip)}")

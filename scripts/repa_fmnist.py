"""REPA on Fashion-MNIST: SiT-T/2 from scratch, + REPA, from USP, USP + REPA, two seeds each, equal budget.

Reuses a finished `usp demo` output (its small VAE, latent cache, domain classifier + reference and USP checkpoint;
copied, never written to) and the demo's SiT recipe exactly (its recorded runs/fmnist-sit-*-s0/config.yaml).
DINOv2 cannot be downloaded here, so the frozen teacher is a stand-in built offline: a small timm ViT (32 px,
patch 8 -> 4x4 tokens, the generator's grid; 64 wide, 4 blocks) trained briefly on the same 20 000 Fashion-MNIST
training images' labels. (A first try, patch 4 -> 8x8 tokens for 2 epochs, reached only 60 % test accuracy in
3 minutes here; patch 8 costs a quarter per step, so it trains 4x the epochs in about the same time.)
Not the demo's domain classifier: that network *is* the FD / class-agreement evaluator, and aligning the
generator to the evaluator's own features would bias the measurement towards REPA.

    python scripts/repa_fmnist.py --demo demo_out --out repa_out --docs docs          # the real runs
    python scripts/repa_fmnist.py --demo demo_out --out /tmp/t --tiny                  # a minutes-long check

Every stage writes <out>/stages/<name>.json and is skipped when that exists, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from usp.config import load_config
from usp.demo import verdict
from usp.train.engine import read_log, train
from usp.train.tasks import build_task

TEACHER = "vit_tiny_patch16_224"  # a timm ViT name; resized by the arguments below
TEACHER_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
# REPA for a 4-block, 128-wide SiT-T/2: block 2 (REPA aligns block 8 of 28 for XL, 4 of 12 for B: about a
# third of the way in; 2 of 4 is the nearest); projector 256 wide (REPA: 2048 for 1152, about 2x the width);
# λ = 0.5 as REPA.
REPA = ["repa.enabled=true", f"repa.teacher={TEACHER}", "repa.depth=2", "repa.coeff=0.5", "repa.projector_dim=256"]
ARMS = ["scratch", "repa", "usp", "usp_repa"]


def stage(out: Path, name: str, fn) -> dict:
    path = out / "stages" / f"{name}.json"
    if path.exists():
        print(f"[repa] {name}: done earlier, skipped", flush=True)
        return json.loads(path.read_text())
    print(f"[repa] {name} ...", flush=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    result = fn()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"[repa] {name}: {result['seconds']} s", flush=True)
    return result


def copy_demo(demo: Path, out: Path) -> dict:
    """What the runs read, copied: the teacher tokens are written beside the latents, never into the demo."""
    from usp.run.checkpoint import latest_weights

    for name in ("vae", "latents"):
        shutil.copytree(demo / name, out / name, dirs_exist_ok=True)
    for name in ("domain.safetensors", "domain_reference.npz"):
        shutil.copy2(demo / name, out / name)
    usp = latest_weights(demo / "runs" / "fmnist-pretrain" / "checkpoints")
    shutil.copy2(usp, out / "usp_weights.safetensors")
    return {"demo": str(demo), "usp_weights": str(usp)}


def images(split: str, limit: int | None):
    from usp.data.images import build_image_dataset, build_transform

    return build_image_dataset("fashion_mnist", None, split, build_transform(32, "center", hflip=False), limit)


def as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1000, shuffle=False)
    xs, ys = zip(*((b["image"], b["label"]) for b in loader))
    return torch.cat(xs), torch.cat(ys)


def train_teacher(out: Path, limit: int, epochs: float, seed: int = 0) -> dict:
    """The stand-in teacher: a small timm ViT trained on the cached training images' labels (random flips, so
    both orientations' tokens are meaningful), AdamW, cosine lr; saved with the arguments that rebuild it."""
    from usp.models.repa import build_teacher_encoder, save_teacher

    torch.manual_seed(seed)
    x, y = as_tensors(images("train", limit))
    test_x, test_y = as_tensors(images("test", None))
    import timm

    model = timm.create_model(TEACHER, pretrained=False, num_classes=10, **TEACHER_KWARGS)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, -1, 1, 1)
    prep = lambda v: ((v + 1) / 2 - mean) / std  # noqa: E731  as usp.models.repa.Teacher.tokens prepares input
    batch, steps = 128, max(1, round(epochs * len(x) / 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)  # 5 % linear warm-up, then cosine to 0 (a ViT from scratch diverges without)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (i + 1) / warmup if i < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup))))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        xb = x[idx]
        flip = torch.rand(batch) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        loss = torch.nn.functional.cross_entropy(model(prep(xb)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(prep(test_x[i : i + 1000])).argmax(1) for i in range(0, len(test_x), 1000)])
    encoder = build_teacher_encoder(TEACHER, **TEACHER_KWARGS)  # the same model without its classifier head
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    save_teacher(encoder, out / "teacher.safetensors", TEACHER_KWARGS)
    accuracy = float((pred == test_y).float().mean())
    return {"images": len(x), "steps": steps, "batch": batch, "final_loss": float(loss.detach()),
            "test_accuracy": accuracy, "teacher": TEACHER, "kwargs": TEACHER_KWARGS}


def cache_features(out: Path, limit: int) -> dict:
    from usp.latent.cache import LatentCacheDataset
    from usp.latent.features import build_features, features_dir, load_repa_teacher

    weights = out / "teacher.safetensors"
    teacher = load_repa_teacher(TEACHER, str(weights))
    folder = features_dir(out / "latents", TEACHER, str(weights))
    latents = LatentCacheDataset(out / "latents", "train", "small-f4", 32, limit)
    path = build_features(teacher, images("train", limit), latents, folder, "train", grid=4)
    return {"path": str(path), "teacher_grid": teacher.grid, "grid": 4}


def run_arm(out: Path, demo: Path, arm: str, seed: int, steps: int | None, eval_samples: int | None,
            eval_every: int | None, limit: int) -> dict:
    """One SiT run: the demo's recorded recipe (scratch or USP), its paths pointed at the copies."""
    usp = arm.startswith("usp")
    recorded = demo / "runs" / f"fmnist-sit-{'usp' if usp else 'scratch'}-s0" / "config.yaml"
    overrides = [f"latent.path={out / 'vae'}", f"latent.cache={out / 'latents'}", f"run.out_dir={out / 'runs'}",
                 f"run.name=sit-{arm}-s{seed}", f"run.seed={seed}", "train.progress=false", f"data.limit={limit}",
                 f"generation.domain_classifier={out / 'domain.safetensors'}",
                 f"generation.domain_reference={out / 'domain_reference.npz'}",
                 *([f"model.init={out / 'usp_weights.safetensors'}"] if usp else []),
                 *([f"train.max_steps={steps}"] if steps else []),
                 *([f"generation.eval_samples={eval_samples}"] if eval_samples else []),
                 *([f"train.eval_every={eval_every}"] if eval_every else []),
                 *([*REPA, f"repa.teacher_weights={out / 'teacher.safetensors'}"] if arm.endswith("repa") else [])]
    config = load_config(recorded, overrides)
    start = time.perf_counter()
    train(config, build_task(config), resume="auto")
    records, evals = read_log(config.run_dir)
    final = records[-1]
    return {"arm": arm, "seed": seed, "run_dir": str(config.run_dir), "run_seconds": time.perf_counter() - start,
            "final_loss": final.get("base_loss", final["loss"]), "final_repa_loss": final.get("repa_loss"),
            "records": records, "evals": evals, "final": evals[-1] if evals else {}}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _plain_loss(records: list[dict]) -> list[dict]:
    """The generation (transport) loss alone, so REPA arms compare with the others on the same quantity."""
    return [{**r, "loss": r.get("base_loss", r["loss"])} for r in records]


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"scratch": "tab:gray", "repa": "tab:orange", "usp": "tab:blue", "usp_repa": "tab:green"}
    names = []
    for what, key, source in (("loss", "loss", "records"), ("fd", "domain_fd", "evals")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (arm, seed), r in sorted(results.items()):
            rows = _plain_loss(r["records"]) if source == "records" else r["evals"]
            ax.plot([x["step"] for x in rows], [x[key] for x in rows], color=colours[arm],
                    linestyle="-" if seed == 0 else "--", marker="o", ms=3, label=f"{arm} s{seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("transport loss (without the REPA term)" if what == "loss" else "domain FD (1000 samples)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"repa_fmnist_{what}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def tally(results: dict, arm: str, base: str, seeds: list[int]) -> str:
    """How many seeds put `arm` beyond / inside / below `base`'s band at the last evaluation."""
    words = []
    for seed in seeds:
        other = seeds[1] if seed == seeds[0] else seeds[0]
        rows = verdict.fd_band(results[(base, seed)]["evals"], results[(base, other)]["evals"],
                               results[(arm, seed)]["evals"])
        f = rows[-1] if rows else None
        words.append("none" if f is None else "beyond" if f["beyond"] else "worse" if -f["gain"] > f["band"]
                     else "inside")
    return (f"{arm} vs {base}: better beyond the band in {words.count('beyond')} of {len(seeds)} seeds, inside in "
            f"{words.count('inside')}, worse beyond it in {words.count('worse')}")


def compare(results: dict, arm: str, base: str, seeds: list[int]) -> list[str]:
    """`arm` vs `base` per seed, paired by seed, against the band of `base`'s two seeds (verdict.fd_band)."""
    lines = []
    for seed in seeds:
        other = seeds[1] if seed == seeds[0] else seeds[0]
        b, o, t = results[(base, seed)], results[(base, other)], results[(arm, seed)]
        rows = verdict.fd_band(b["evals"], o["evals"], t["evals"])
        loss = verdict.paired_loss(_plain_loss(t["records"]), _plain_loss(b["records"]), _plain_loss(o["records"]))
        if not rows:
            lines.append(f"- {arm} vs {base}, seed {seed}: no common evaluation step.")
            continue
        f = rows[-1]
        word = ("better beyond the band" if f["beyond"] else "worse beyond the band" if -f["gain"] > f["band"]
                else "inside the band")
        text = (f"- **{arm} vs {base}, seed {seed}** (step {f['step']}): domain FD {f['usp']:.1f} vs {f['scratch']:.1f}"
                f" (gain {f['gain']:+.1f}; band ±{f['band']:.1f} = max(|{base} s{seed} − {base} s{other}| = "
                f"{f['seed_spread']:.1f}, 2 × bootstrap SE)) — **{word}**")
        if loss.get("rows"):
            text += (f"; paired transport loss {100 * loss['gain_mean']:+.1f}% (second half; chance gap between "
                     f"{base} seeds max {100 * loss['chance_max']:.1f}%, {'beyond' if loss['beyond'] else 'inside'})")
        lines.append(text + f"; class agreement {f['usp_agreement']:.2f} vs {f['scratch_agreement']:.2f}.")
    return lines


def report(out: Path, docs: Path, results: dict, seeds: list[int], teacher: dict, features: dict,
           demo: Path) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    check = []  # the scratch arm is the demo's own run: its numbers must come out the same
    for arm, seed in (("scratch", s) for s in seeds):
        recorded = demo / "stages" / f"sit_scratch_s{seed}.json"
        if recorded.is_file() and (arm, seed) in results:
            theirs = json.loads(recorded.read_text())["final"].get("domain_fd", math.nan)
            ours = results[(arm, seed)]["final"].get("domain_fd", math.nan)
            check.append(f"scratch seed {seed}: domain FD {ours:.4f} here, {theirs:.4f} in the demo's own run")
    images_ = plots(results, docs)
    table = ["| arm | seed | final transport loss | final REPA loss | domain FD ± SE | class agreement "
             "| wall (s, incl. evals) |",
             "|---|---|---|---|---|---|---|"]
    for (arm, seed), r in sorted(results.items(), key=lambda kv: (ARMS.index(kv[0][0]), kv[0][1])):
        f = r["final"]
        repa = f"{r['final_repa_loss']:.3f}" if r["final_repa_loss"] is not None else "—"
        table.append(f"| {arm} | {seed} | {r['final_loss']:.4f} | {repa} | {f.get('domain_fd', math.nan):.1f} ± "
                     f"{f.get('domain_fd_se', math.nan):.1f} | {f.get('class_agreement', math.nan):.3f} | "
                     f"{r['seconds']:.0f} |")
    lines = ["# REPA on Fashion-MNIST (SiT-T/2, 8 runs)", "",
             "Written by `scripts/repa_fmnist.py` (rerun it to reproduce; see its docstring). The demo's SiT recipe "
             "(sit_t_2, batch 128, lr 2e-3 constant, EMA 0.99, heun 6 steps, CFG 2.0) from the recorded "
             f"`runs/fmnist-sit-*-s0/config.yaml` of a default `usp demo`; every arm gets the same steps "
             f"({results[('scratch', seeds[0])]['records'][-1]['step']}), batch, data order and sample seeds.", "",
             f"Teacher (stand-in for DINOv2, which cannot be downloaded here): timm `{TEACHER}` with "
             f"{teacher['kwargs']}, trained {teacher['steps']} steps (batch {teacher['batch']}, AdamW, random "
             f"flips) on the labels of the same {teacher['images']} training images, accuracy on the 10 000 test "
             f"images {teacher['test_accuracy']:.3f}. Its {features['teacher_grid']}×{features['teacher_grid']} "
             "tokens (the generator's grid: 4×4) are cached beside the latents (plain and flipped). Not the "
             "domain classifier: that is the evaluator. Unlike DINOv2 it is label-supervised, so REPA here also "
             "passes class information into the generator.", "",
             f"REPA settings: {', '.join(REPA[2:])} (see the script for why).", "",
             "Same recipe as the demo, checked: " + ("; ".join(check) or "no demo stage files to compare") + ".", "",
             "Domain FD: Fréchet distance in the domain classifier's 128-d features between 1000 class-balanced "
             "samples and the 10 000 test images (not Inception FID); ± is its bootstrap SE. Class agreement: the "
             "classifier's label = the conditioning label (chance 0.10). Transport loss excludes the REPA term. "
             "Wall time: each run on a 2-core machine shared with other jobs (load average in the stage files).", "",
             *table, "", "## Summary", "",
             *[f"- {tally(results, a, b, seeds)}." for a, b in (("repa", "scratch"), ("usp", "scratch"),
                                                                ("usp_repa", "scratch"), ("usp_repa", "usp"))], "",
             "Read with care: two seeds per arm make a coarse band (one seed gap); 1000 samples and 400 steps of a "
             "4-block SiT are far from the paper's scale; and the stand-in teacher is label-supervised (DINOv2 is "
             "not), so part of what REPA adds here may be class information, which the class-agreement column "
             "would show first. FD is evaluated every 100 steps here (the demo: at 400 only); evaluation "
             "runs under a forked RNG and changes no training step, so step 400 is the demo's number (the check "
             "above; the last digits differ by float summation order, not by recipe).", "",
             "## Verdict against the noise band", "",
             "Rule of `usp/demo/verdict.py`: an arm beats its baseline only when its FD gain exceeds the band = "
             "max(the gap between the baseline's two seeds, 2 × the combined bootstrap SE).", "",
             *compare(results, "repa", "scratch", seeds), *compare(results, "usp", "scratch", seeds),
             *compare(results, "usp_repa", "scratch", seeds), *compare(results, "usp_repa", "usp", seeds), "",
             *[f"![{name}]({name})" for name in images_], ""]
    path = docs / "repa_fmnist.md"
    path.write_text("\n".join(lines))
    (docs / "repa_fmnist.json").write_text(json.dumps(
        {f"{a}_s{s}": {k: v for k, v in r.items() if k != "records"} for (a, s), r in results.items()}, indent=1))
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished `usp demo` output folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="where the copies, teacher, tokens and runs go")
    parser.add_argument("--docs", type=Path, default=None, help="where the report and PNGs go (default: --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--teacher-epochs", type=float, default=8.0)
    parser.add_argument("--tiny", action="store_true", help="a check: 2000 images, 20 steps, 100 samples")
    args = parser.parse_args(argv)
    if len(args.seeds) != 2:
        parser.error("--seeds takes two seeds: their gap is the noise band")
    out, docs = args.out.resolve(), (args.docs or args.out).resolve()
    demo = args.demo.resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit = 2000 if args.tiny else json.loads((demo / "stages" / "cache.json").read_text())["train"]
    steps, samples, every = (20, 100, 10) if args.tiny else (None, None, 100)
    stage(out, "copy", lambda: copy_demo(demo, out))
    teacher = stage(out, "teacher", lambda: train_teacher(out, limit, 0.1 if args.tiny else args.teacher_epochs))
    features = stage(out, "features", lambda: cache_features(out, limit))
    results = {}
    for arm in ARMS:
        for seed in args.seeds:
            results[(arm, seed)] = stage(out, f"sit_{arm}_s{seed}", lambda arm=arm, seed=seed: run_arm(
                out, demo, arm, seed, steps, samples, every, limit))
    return report(out, docs, results, args.seeds, teacher, features, demo)


if __name__ == "__main__":
    print(main())

"""`usp <command>`: parse, load the recipe, call the library. Nothing else lives here.

Examples:
  usp train-vae configs/fmnist/vae.yaml
  usp cache-latents configs/fmnist/pretrain.yaml --splits train test
  usp pretrain configs/fmnist/pretrain.yaml train.max_steps=200
  usp pretrain configs/pretrain/vit_b_2_sdvae_224.yaml data.root=/data/imagenet   # under torchrun
  usp reconstruct runs/fmnist-pretrain/checkpoints/weights_0000200.safetensors --out restore.png
  usp finetune configs/fmnist/dit_usp.yaml
  usp sample runs/fmnist-dit-usp/checkpoints/weights_0002000.safetensors --num-samples 1000
  usp evaluate VIRTUAL_imagenet256_labeled.npz samples_50000.npz --out metrics.json
  usp probe configs/fmnist/probe.yaml --fast
"""

from __future__ import annotations

import argparse
import json
import sys

TRAIN_COMMANDS = {
    "pretrain": "pretrain",
    "train-vae": "vae",
    "finetune": "finetune",
    "probe": "probe",
    "classify": "classify",
}


def _recipe(args: argparse.Namespace, task: str | None = None):
    """The resolved recipe; a training command sets run.task and refuses a recipe written for another."""
    from usp.config import load_config, read_recipe

    overrides = list(args.overrides)
    if task is not None:
        written = read_recipe(args.recipe) if args.recipe else {}
        declared = (written.get("run") or {}).get("task")
        if declared not in (None, task):
            raise ValueError(f"{args.recipe} is a run.task={declared} recipe; run it with `usp "
                             f"{next(c for c, t in TRAIN_COMMANDS.items() if t == declared)}` instead")
        overrides.append(f"run.task={task}")
    return load_config(args.recipe, overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from usp.train.engine import setup_runtime, train
    from usp.train.tasks import build_task

    if getattr(args, "fast", False):
        return cmd_probe_fast(args)
    config = _recipe(args, TRAIN_COMMANDS[args.command])
    if args.dry_run:
        print(config.to_yaml())
        return
    runtime = setup_runtime(config.run.device)
    task = build_task(config)
    resume = None if args.resume == "none" else args.resume
    train(config, task, runtime, resume=resume)
    print(f"run folder: {config.run_dir}")


def cmd_probe_fast(args: argparse.Namespace) -> None:
    from usp.train.tasks.classification import fast_probe

    config = _recipe(args, "probe")
    result = fast_probe(config)
    print(json.dumps(result, indent=1))


def cmd_sample(args: argparse.Namespace) -> None:
    from usp.sample.run import run_sampling

    path = run_sampling(args.weights, args.overrides, out_dir=args.out, num_samples=args.num_samples,
                        seed=args.seed, balanced=args.balanced, batch_size=args.batch_size, model_name=args.model,
                        grid=args.grid)
    print(f"wrote {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from usp.evaluate.reference import main as evaluate_main

    evaluate_main(args.ref, args.samples, out_json=args.out, inception_weights=args.inception_weights,
                  batch_size=args.batch_size, device=args.device)


def cmd_cache_latents(args: argparse.Namespace) -> None:
    import torch

    from usp.data.images import build_image_dataset, build_transform
    from usp.latent.cache import build_cache
    from usp.latent.vae import LatentSpace

    config = _recipe(args)
    lc, dc = config.latent, config.data
    folder = args.out or lc.cache
    if folder is None:
        raise SystemExit("error: give --out DIR or set latent.cache in the recipe")
    latent = LatentSpace.load(lc.space, lc.path)
    latent.check_image_size(dc.image_size)
    # The ADM centre crop as DiT trains; the flip is stored beside each image.
    crop = "adm_center" if dc.source == "folder" else "center"
    transform = build_transform(dc.image_size, crop, hflip=False, normalize=dc.normalize)
    device = "cuda" if torch.cuda.is_available() and config.run.device != "cpu" else "cpu"
    for split in args.splits:
        dataset = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download)
        path = build_cache(dataset, latent, dc.image_size, folder, split, args.batch_size, dc.num_workers, device)
        print(f"{split}: {len(dataset)} images -> {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    from usp.demo.pipeline import run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed, full=args.full)
    print(f"report: {report}")


def cmd_compare_run(args: argparse.Namespace) -> None:
    from usp.evaluate.compare import FD_TOL, LOSS_TOL, SKIP, compare, format_comparison, load_runs

    run = load_runs(args.run)
    if len(run) != 1:
        raise ValueError(f"RUN must be one run (a folder with log.jsonl); {args.run} holds {len(run)}")
    references = load_runs(args.reference)
    loss_tol = LOSS_TOL if args.loss_tol is None else args.loss_tol
    fd_tol = FD_TOL if args.fd_tol is None else args.fd_tol
    skip = SKIP if args.skip is None else args.skip
    result = compare(run[0], references, loss_tol=loss_tol, fd_tol=fd_tol, patience=args.patience, skip=skip)
    print(format_comparison(result, run[0].name, [r.name for r in references], loss_tol, fd_tol, args.patience,
                            skip))
    if result.diverged:
        raise SystemExit(1)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    from usp.evaluate.reconstruct import reconstruct_grid

    path = reconstruct_grid(args.weights, args.out, num_images=args.num_images, mask_ratio=args.mask_ratio,
                            seed=args.seed, overrides=args.overrides)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", nargs="?", help="YAML recipe (configs/...); omitted = built-in defaults")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.blr=1e-4")

    for name in TRAIN_COMMANDS:
        p = sub.add_parser(name, help=f"train: {name}", formatter_class=argparse.RawTextHelpFormatter,
                           description=f"example: usp {name} configs/fmnist/{TRAIN_COMMANDS[name]}.yaml "
                                       "train.max_steps=100")
        recipe_args(p)
        p.add_argument("--resume", default="auto",
                       help="auto: continue from the latest checkpoint of the run folder (default); "
                            "none: start fresh (refuses to overwrite); or a state_*.pt path")
        p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
        if name == "probe":
            p.add_argument("--fast", action="store_true",
                           help="frozen features once + logistic regression and k-NN (NOT the paper's protocol)")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache-latents", help="encode a dataset once into a memory-mapped latent cache")
    recipe_args(p)
    p.add_argument("--out", help="cache folder (default: the recipe's latent.cache)")
    p.add_argument("--splits", nargs="+", default=["train"], help="splits to encode (default: train)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("sample", help="class-conditional samples: PNG grid + ADM-format NPZ (torchrun-sharded)",
                       description="example: usp sample runs/x/checkpoints/weights_0010000.safetensors "
                                   "--num-samples 50000 generation.cfg_scale=1.5")
    p.add_argument("weights", help="weights_*.safetensors of `usp finetune`, or a public DiT/SiT .pt with --model")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. generation.cfg_scale=1.5 "
                                               "generation.sample_steps=250")
    p.add_argument("--model", help="registry name for a public checkpoint without usp metadata, e.g. dit_xl_2")
    p.add_argument("--out", help="output folder (default: <run>/samples_<N>)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="labels i % num_classes instead of random labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=64, help="images in the PNG grid")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FID, sFID, IS, precision, recall with ADM's definitions")
    p.add_argument("ref", help="ADM reference batch (.npz with arr_0 and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("samples", help="samples .npz (arr_0 uint8 N×H×W×3)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the whole method on Fashion-MNIST on one CPU, with a report",
                       description="example: usp demo --out demo_out   (resumable: finished stages are skipped)")
    p.add_argument("--out", default="demo_out", help="output folder (report.md, PNGs, runs)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the whole pipeline in minutes")
    p.add_argument("--full", action="store_true",
                   help="the reproduction (about an hour on 2 CPU cores): longer pretraining, DiT and SiT from USP "
                        "and from scratch, 1 000 steps, two seeds, steps-to-reach table")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare-run", help="a run against a reference: loss, lr, FD side by side; where it diverges",
                       formatter_class=argparse.RawTextHelpFormatter,
                       description="example: usp compare-run demo_out/runs/fmnist-sit-usp docs/demo/reference/sit_usp\n"
                                   "exit status: 0 within the reference's band, 1 when the run leaves it")
    p.add_argument("run", help="a run folder (holding log.jsonl) or its log.jsonl")
    p.add_argument("reference", help="a run folder, a log.jsonl, or a folder of run folders (several seeds: "
                                     "their envelope is the band)")
    p.add_argument("--loss-tol", type=_fraction, help="relative loss tolerance around the band "
                                                      "(default: usp.evaluate.compare.LOSS_TOL, 0.05)")
    p.add_argument("--fd-tol", type=_fraction, help="relative FD tolerance, on top of 2 × the bootstrap "
                                                    "error (default: usp.evaluate.compare.FD_TOL, 0.10)")
    p.add_argument("--patience", type=_positive, default=2, help="consecutive logged steps outside the band that "
                                                           "count as leaving it (default 2)")
    p.add_argument("--skip", type=_fraction, help="fraction of the matching steps shown but not judged: the "
                                                  "initial transient, where seeds differ by their random init "
                                                  "(default: usp.evaluate.compare.SKIP, 0.2)")
    p.set_defaults(func=cmd_compare_run)

    p = sub.add_parser("reconstruct", help="the restoration figure: original | masked | reconstruction")
    p.add_argument("weights", help="weights_*.safetensors of a pretraining run")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the data, e.g. data.root=...")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reconstruct)
    return parser


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), e.g. 0.05 for 5 %; got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    # Before torch loads its thread pools: on a CPU shared with other processes, spinning OpenMP/OpenBLAS
    # waiters steal the cores the working threads need (2-4x slower steps measured here). Explicit settings win.
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()

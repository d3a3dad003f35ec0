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
  usp pretrain fmnist/pretrain --resume none train.max_steps=50   # shipped recipe by name; any order
  usp init --data my_images --out my_usp             # scan my_images/{train,val}/<class>/, write recipes
  usp demo --data my_images --quick --out my_demo    # the whole pipeline and report on my_images
  usp list recipes
  usp reference my_images/val --out ref.npz --image-size 32
  usp fetch pretrain/vit_b_2_sdvae_224 --cache usp_assets     # on a connected machine, for offline jobs
  usp probe configs/fmnist/probe.yaml            # the paper's linear probe (LARS); result.json in the run folder
  usp classify configs/fmnist/classify.yaml      # full fine-tuning, Table 13 augmentation
  usp probe runs/fmnist-dit-usp/checkpoints/weights_0001500.safetensors --blocks 2 4 --noise-levels 0.1 0.5
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from usp import RunError

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

    if args.command == "probe" and args.recipe and args.recipe.endswith((".safetensors", ".pt")):
        return dry_run(args) if args.dry_run else cmd_probe_backbone(args)
    config = _recipe(args, TRAIN_COMMANDS[args.command])
    if args.dry_run:
        print(config.to_yaml())
        return
    if getattr(args, "fast", False):
        return cmd_probe_fast(args)
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


def dry_run(args: argparse.Namespace) -> None:
    """What a command would do, without doing it: its arguments, and the resolved recipe where it reads one."""
    plan = {key: value for key, value in vars(args).items() if key not in ("func", "dry_run")}
    print(json.dumps(plan, indent=1, default=str))
    if args.command == "cache-latents":
        print(_recipe(args).to_yaml())


def cmd_probe_backbone(args: argparse.Namespace) -> None:
    from usp.evaluate.backbone_probe import format_table, probe_backbone
    from usp.sample.run import load_generator

    model, config = load_generator(args.recipe, list(args.overrides), args.model)
    result = probe_backbone(model, config, args.recipe, blocks=args.blocks, noise_levels=args.noise_levels)
    print(json.dumps(result, indent=1))
    print(format_table(result))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=1))


def cmd_sample(args: argparse.Namespace) -> None:
    from usp.models.transfer import resolve_checkpoint
    from usp.sample.run import run_sampling

    path = run_sampling(resolve_checkpoint(args.weights), args.overrides, out_dir=args.out,
                        num_samples=args.num_samples, seed=args.seed, balanced=args.balanced,
                        batch_size=args.batch_size, model_name=args.model, grid=args.grid)
    print(f"wrote {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from usp.evaluate.reference import main as evaluate_main

    for name, path in (("reference", args.ref), ("samples", args.samples)):  # before Inception loads (slow)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} batch {path} not found; write one with `usp reference DIR --out "
                                    f"ref.npz` or `usp sample`")

    evaluate_main(args.ref, args.samples, out_json=args.out, inception_weights=args.inception_weights,
                  batch_size=args.batch_size, device=args.device)


def cmd_cache_latents(args: argparse.Namespace) -> None:
    import torch

    from usp.data.images import build_image_dataset, build_transform
    from usp.latent.cache import build_cache, cache_crop, cache_source
    from usp.latent.features import build_recipe_features
    from usp.latent.vae import LatentSpace

    config = _recipe(args)
    lc, dc = config.latent, config.data
    folder = args.out or lc.cache
    if folder is None:
        raise SystemExit("error: give --out DIR or set latent.cache in the recipe")
    latent = LatentSpace.load(lc.space, lc.path, max_batch=lc.vae_batch)
    latent.check_image_size(dc.image_size)
    # The ADM centre crop as DiT trains; the flip is stored beside each image.
    transform = build_transform(dc.image_size, cache_crop(dc.source), hflip=False, normalize=dc.normalize)
    device = "cuda" if torch.cuda.is_available() and config.run.device != "cpu" else "cpu"
    for split in args.splits:
        dataset = build_image_dataset(dc.source, dc.root, split, transform, dc.limit, dc.download, dc.exclude)
        path = build_cache(dataset, latent, dc.image_size, folder, split, args.batch_size or lc.vae_batch,
                           dc.num_workers, device,
                           source=cache_source(config, split))
        print(f"{split}: {len(dataset)} images -> {path}")
        tokens = build_recipe_features(config, dataset, split, folder, device)  # REPA's teacher tokens, if on
        if tokens:
            print(f"{split}: REPA teacher tokens -> {tokens}")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.data:
        from usp.demo.own_data import run_own_data_demo

        report = run_own_data_demo(args.data, args.out, quick=args.quick, seed=args.seed,
                                   image_size=args.image_size, flip=not args.no_flip)
    else:
        from usp.demo.pipeline import run_demo

        report = run_demo(args.out, quick=args.quick, seed=args.seed, full=args.full)
    print(f"report: {report}")


def cmd_init(args: argparse.Namespace) -> None:
    from usp.demo.init import init_recipes

    scan, plan, files = init_recipes(args.data, args.out, image_size=args.image_size, flip=not args.no_flip)
    print(scan.table())
    print(f"\n{plan.image_size} px, latent space {plan.latent_space}, {plan.num_classes} classes; recipes:")
    for path in files:
        print(f"  {path}")
    first = files[0].parent
    steps = ([f"usp train-vae {first / 'vae.yaml'}"] if plan.small_vae else []) + [
        f"usp cache-latents {first / 'pretrain.yaml'} --splits {scan.train_split} {scan.eval_split}",
        f"usp pretrain {first / 'pretrain.yaml'}", f"usp finetune {first / 'dit_usp.yaml'}",
        f"usp probe {first / 'probe.yaml'} --fast"]
    print("next:\n" + "\n".join(f"  {line}" for line in steps))


def cmd_list(args: argparse.Namespace) -> None:
    from usp.demo.listing import listing

    print(listing(args.what))


def cmd_fetch(args: argparse.Namespace) -> None:
    from usp.demo.fetch import fetch

    for line in fetch(args.recipes, args.cache, inception=not args.no_inception):
        print(line)


def cmd_reference(args: argparse.Namespace) -> None:
    from usp.evaluate.reference import reference_batch_from_folder

    path = reference_batch_from_folder(args.folder, args.out, args.image_size, num_images=args.num, seed=args.seed)
    print(f"wrote {path}")


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
    from usp.models.transfer import resolve_checkpoint

    path = reconstruct_grid(resolve_checkpoint(args.weights), args.out, num_images=args.num_images,
                            mask_ratio=args.mask_ratio, seed=args.seed, overrides=args.overrides)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or USP_DEBUG=1)")
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
            p.description += ("\n   or: usp probe runs/fmnist-dit-usp/checkpoints/weights_0001500.safetensors "
                              "--blocks 2 4 --noise-levels 0.1 0.5   (a DiT/SiT backbone)")
            p.add_argument("--fast", action="store_true",
                           help="frozen features once + logistic regression and k-NN (NOT the paper's protocol)")
            p.add_argument("--blocks", type=_positive_int, default=[2, 4], nargs="+",
                           help="DiT/SiT checkpoint: probe the mean-pooled tokens after these blocks (from 1)")
            p.add_argument("--noise-levels", type=_unit_float, default=[0.1, 0.5], nargs="+",
                           help="DiT/SiT checkpoint: noise levels s in [0, 1] (0 = data, 1 = noise)")
            p.add_argument("--model", help="DiT/SiT checkpoint without usp metadata: its registry name")
            p.add_argument("--out", help="DiT/SiT checkpoint: also write the result JSON here")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache-latents", help="encode a dataset once into a memory-mapped latent cache")
    recipe_args(p)
    p.add_argument("--out", help="cache folder (default: the recipe's latent.cache)")
    p.add_argument("--splits", nargs="+", default=["train"], help="splits to encode (default: train)")
    p.add_argument("--batch-size", type=_positive_int, help="images per batch (default: the recipe's latent.vae_batch)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the splits, then exit")
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("sample", help="class-conditional samples: PNG grid + ADM-format NPZ (torchrun-sharded)",
                       description="example: usp sample runs/x/checkpoints/weights_0010000.safetensors "
                                   "--num-samples 50000 generation.cfg_scale=1.5")
    p.add_argument("weights", help="weights_*.safetensors of `usp finetune`, or a public DiT/SiT .pt with --model")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. generation.cfg_scale=1.5 "
                                               "generation.sample_steps=250; generation.preset=dit|repa; "
                                               "generation.guidance_interval=[0,0.7] (noise level, 1 = noise)")
    p.add_argument("--model", help="registry name for a public checkpoint without usp metadata, e.g. dit_xl_2")
    p.add_argument("--out", help="output folder (default: <run>/samples_<N>)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="labels i %% num_classes instead of random labels")
    p.add_argument("--batch-size", type=_positive_int, help="samples per batch and rank (default: the recipe's "
                                                            "train.eval_batch)")
    p.add_argument("--grid", type=int, default=64, help="images in the PNG grid")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FID, sFID, IS, precision, recall with ADM's definitions")
    p.add_argument("ref", help="ADM reference batch (.npz with arr_0 and/or mu, sigma, mu_s, sigma_s)")
    p.add_argument("samples", help="samples .npz (arr_0 uint8 N×H×W×3)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the whole method on Fashion-MNIST (or --data DIR) on one CPU, with a report",
                       description="example: usp demo --out demo_out   (resumable: finished stages are skipped)\n"
                                   "         usp demo --data my_images --quick --out my_demo")
    p.add_argument("--out", default="demo_out", help="output folder (report.md, PNGs, runs)")
    p.add_argument("--data", help="your ImageFolder tree DIR/{train,val}/<class>/<image> instead of Fashion-MNIST")
    p.add_argument("--image-size", type=int, help="with --data: the training resolution (default: the images')")
    p.add_argument("--no-flip", action="store_true", help="with --data: no horizontal flips (digits, text)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the whole pipeline in minutes")
    p.add_argument("--full", action="store_true",
                   help="the reproduction (about an hour on 2 CPU cores): longer pretraining, DiT and SiT from USP "
                        "and from scratch, 1 000 steps, two seeds, steps-to-reach table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("init", help="scan an ImageFolder tree and write a recipe set for it",
                       description="example: usp init --data my_images --out my_usp")
    p.add_argument("--data", required=True, help="DIR/{train,val}/<class>/<image> (ImageNet layout)")
    p.add_argument("--out", help="folder for recipes/ and runs (default: usp_<data folder name>)")
    p.add_argument("--image-size", type=int, help="training resolution (default: the images' common short side)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (digits, text must not be mirrored)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("list", help="models, latent spaces and shipped recipes, one line each",
                       description="example: usp list recipes")
    p.add_argument("what", nargs="?", choices=("models", "latent-spaces", "recipes", "all"), default="all")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("reference", help="an ADM-format reference batch (ADM centre crop) from an image folder",
                       description="example: usp reference my_images/val --out ref.npz --image-size 32")
    p.add_argument("folder", help="a folder of images, searched recursively")
    p.add_argument("--out", required=True, help="the .npz to write (arr_0 uint8 N×H×W×3)")
    p.add_argument("--image-size", type=int, default=256, help="side of the ADM centre crop (default 256)")
    p.add_argument("--num", type=int, help="a random subset of this many images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("fetch", help="download the hub assets of recipes (VAE, Inception) for an offline machine",
                       description="example: usp fetch pretrain/vit_b_2_sdvae_224 --cache /shared/usp_assets")
    p.add_argument("recipes", nargs="+", help="recipes (paths or shipped names) whose assets to download")
    p.add_argument("--cache", required=True, help="one folder for everything (copy it to the offline machine)")
    p.add_argument("--no-inception", action="store_true", help="skip the FID Inception weights")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_fetch)

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
    p.add_argument("--patience", type=_positive_int, default=2, help="consecutive logged steps outside the band that "
                                                           "count as leaving it (default 2)")
    p.add_argument("--skip", type=_fraction, help="fraction of the matching steps shown but not judged: the "
                                                  "initial transient, where seeds differ by their random init "
                                                  "(default: usp.evaluate.compare.SKIP, 0.2)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_compare_run)

    p = sub.add_parser("reconstruct", help="the restoration figure: original | masked | reconstruction")
    p.add_argument("weights", help="weights_*.safetensors of a pretraining run")
    p.add_argument("overrides", nargs="*", help="recipe overrides for the data, e.g. data.root=...")
    p.add_argument("--out", default="reconstruction.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    p.set_defaults(func=cmd_reconstruct)
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the `section.key=value` overrides out of argv wherever they stand, so options and overrides mix in
    any order: argparse would give `--splits train val a.b=1` the override as a split, and refuses positionals
    after `--resume X`. An override names a dotted key, which no option value or path of usp looks like."""
    rest, overrides = [], []
    for i, token in enumerate(argv):
        if token == "--":
            return rest + argv[i:], overrides
        (overrides if _OVERRIDE.match(token) else rest).append(token)
    return rest, overrides


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1] (0 = data, 1 = noise), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), e.g. 0.05 for 5 %; got {text}")
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
    argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"`usp {args.command}` takes no key=value overrides, got {' '.join(overrides)}")
        args.overrides = [*args.overrides, *overrides]
    try:
        if getattr(args, "dry_run", False) and args.func is not cmd_train:
            dry_run(args)
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RunError) as err:
        if args.debug or os.environ.get("USP_DEBUG") == "1":
            raise
        message = " ".join(str(err).split())  # one line, whatever the library put in it
        print(f"error: {message} (traceback: --debug or USP_DEBUG=1)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""`usp <command>`: parse, load the recipe, call the library. Nothing else lives here.

`usp --help` lists the commands and an example of each (declared once, with the command); `usp COMMAND --help`
its options. Every command takes --dry-run; options and `section.key=value` overrides mix in any order.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from usp import RunError
from usp.config import load_config, read_recipe, split_overrides

TRAIN_COMMANDS = {"pretrain": "pretrain", "train-vae": "vae", "finetune": "finetune", "probe": "probe",
                  "classify": "classify"}
TRAIN_EXAMPLES = {
    "pretrain": ["usp pretrain configs/fmnist/pretrain.yaml train.max_steps=200",
                 "usp pretrain fmnist/pretrain --resume none train.max_steps=50   # shipped recipe by name, any order",
                 "usp pretrain configs/pretrain/vit_b_2_sdvae_224.yaml data.root=/data/imagenet   # under torchrun"],
    "train-vae": ["usp train-vae configs/fmnist/vae.yaml"], "finetune": ["usp finetune configs/fmnist/dit_usp.yaml"],
    "probe": ["usp probe configs/fmnist/probe.yaml --fast   # without --fast: the paper's linear probe (LARS)"],
    "classify": ["usp classify configs/fmnist/classify.yaml   # full fine-tuning, Table 13 augmentation"],
}


def _recipe(args: argparse.Namespace, task: str | None = None):
    """The resolved recipe; a training command sets run.task and refuses a recipe written for another."""
    overrides = list(args.overrides)
    if task is not None:
        if args.recipe and args.recipe.endswith((".safetensors", ".pt")):
            raise ValueError(f"{args.recipe} is a weights file; `usp {args.command}` takes a recipe (the probe of a "
                             "DiT/SiT backbone is `usp probe-backbone WEIGHTS`)")
        declared = ((read_recipe(args.recipe) if args.recipe else {}).get("run") or {}).get("task")
        if declared not in (None, task):
            raise ValueError(f"{args.recipe} is a run.task={declared} recipe; run it with `usp "
                             f"{next(c for c, t in TRAIN_COMMANDS.items() if t == declared)}` instead")
        overrides.append(f"run.task={task}")
    return load_config(args.recipe, overrides)


def dry_run(args: argparse.Namespace) -> None:
    """What a command would do, without doing it: a training command's resolved recipe; any other command's
    arguments, and the resolved recipe where it reads one."""
    if args.command not in TRAIN_COMMANDS:
        print(json.dumps({k: v for k, v in vars(args).items() if k not in ("func", "dry_run")}, indent=1, default=str))
    if "recipe" in vars(args):
        print(_recipe(args, TRAIN_COMMANDS.get(args.command)).to_yaml())


def call(args: argparse.Namespace) -> None:
    """Run the command: its function gets the parsed options as keywords, a recipe resolved (as `config`). A library
    function is named `module:function` and imported only now, so that `usp --help` loads no torch; an int it
    returns is the exit status (anything else it returns, e.g. evaluate's metrics, it has printed already)."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "dry_run", "func")}
    if "recipe" in options:
        options["config"] = _recipe(args, TRAIN_COMMANDS.get(args.command))
        del options["recipe"], options["overrides"]
    function = args.func
    if isinstance(function, str):
        module, name = function.split(":")
        function = getattr(importlib.import_module(module), name)
    status = function(**options)
    if isinstance(status, int) and status:
        raise SystemExit(status)


def probe_backbone(weights: str, overrides: list[str], model: str | None, blocks: list[int],
                   noise_levels: list[float], out: str | None) -> None:
    """`usp probe-backbone`: the generator is loaded here, as a recipe is for the other commands (its loader,
    `usp.sample.run`, sits beside the probe's package, not below it), then probed (`usp.evaluate.backbone_probe`)."""
    from usp.evaluate.backbone_probe import probe_command
    from usp.run.weights import resolve_weights
    from usp.sample.run import load_generator

    weights = str(resolve_weights(weights))  # a run folder or RUN/latest, as the help says
    generator, config = load_generator(weights, list(overrides), model)
    probe_command(generator, config, weights, blocks, noise_levels, out)


# What each command calls with its options: a library function as `module:function` (imported only when the command
# runs, so that `usp --help` loads no torch), or the function above where the CLI first loads a generator.
CALLS = {
    **dict.fromkeys(TRAIN_COMMANDS, "usp.train.tasks:train_command"),
    "probe-backbone": probe_backbone,
    "cache-latents": "usp.latent.cache:cache_latents_command",
    "sample": "usp.sample.run:sample_command",
    "evaluate": "usp.evaluate.reference:evaluate_command",
    "demo": "usp.demo.pipeline:demo_command",
    "init": "usp.recipe_tools.init:init_command",
    "list": "usp.recipe_tools.listing:list_command",
    "reference": "usp.evaluate.reference:reference_command",
    "fetch": "usp.recipe_tools.fetch:fetch_command",
    "compare-run": "usp.evaluate.compare:compare_command",
    "reconstruct": "usp.evaluate.reconstruct:reconstruct_command",
    "export": "usp.export:export_command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or USP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    # Flags declared once, for the commands that share them: every command; a recipe; a weights file; an image tree.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--dry-run", action="store_true",
                        help="print what would run (a training command: its resolved recipe), then exit")
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("recipe", nargs="?", help="YAML recipe (configs/... or a shipped name); omitted = defaults")
    recipe.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.blr=1e-4")
    weights = argparse.ArgumentParser(add_help=False)
    weights.add_argument("weights", help="weights_*.safetensors (or its run folder); a public DiT/SiT .pt with --model")
    weights.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.root=... generation.cfg_scale=1.5")
    tree = argparse.ArgumentParser(add_help=False)
    tree.add_argument("--image-size", type=int, help="with a tree: the training resolution (default: the images')")
    tree.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (digits, text)")

    examples: list[str] = []

    def command(name: str, what: str, *example: str, parents=()):
        examples.extend(example)
        p = sub.add_parser(name, help=what, parents=[shared, *parents], formatter_class=argparse.RawTextHelpFormatter,
                           description="examples:\n" + "\n".join(f"  {line}" for line in example))
        p.set_defaults(func=CALLS[name])
        return p.add_argument

    for name in TRAIN_COMMANDS:
        arg = command(name, f"train: {name}", *TRAIN_EXAMPLES[name], parents=[recipe])
        arg("--resume", default="auto", help="auto: continue from the run folder's latest checkpoint (default); "
                                              "none: start fresh (refuses to overwrite); or a state_*.pt path")
        if name == "probe":
            arg("--fast", action="store_true", help="frozen features + logistic regression and k-NN (NOT the paper's)")

    arg = command("probe-backbone", "frozen-feature probe of a DiT/SiT generator's blocks at noise levels",
                  "usp probe-backbone runs/fmnist-dit-usp/checkpoints/weights_0001500.safetensors --blocks 2 4 "
                  "--noise-levels 0.1 0.5", parents=[weights])
    arg("--blocks", type=_positive_int, default=[2, 4], nargs="+", help="mean-pooled tokens after these blocks")
    arg("--noise-levels", type=_unit_float, default=[0.1, 0.5], nargs="+", help="s in [0, 1] (0 = data, 1 = noise)")
    arg("--model", help="a checkpoint without usp metadata: its registry name")
    arg("--out", help="also write the result JSON here")

    arg = command("cache-latents", "encode a dataset once into a memory-mapped latent cache",
                  "usp cache-latents configs/fmnist/pretrain.yaml --splits train test", parents=[recipe])
    arg("--out", help="cache folder (default: the recipe's latent.cache)")
    arg("--splits", nargs="+", default=["train"], help="splits to encode (default: train)")
    arg("--batch-size", type=_positive_int, help="images per batch (default: the recipe's latent.vae_batch)")

    arg = command("sample", "class-conditional samples: PNG grid + ADM-format NPZ (torchrun-sharded)",
                  "usp sample runs/fmnist-dit-usp/checkpoints/weights_0002000.safetensors --num-samples 1000 "
                  "generation.cfg_scale=2   # or generation.preset=dit|repa", parents=[weights])
    arg("--model", help="registry name for a public checkpoint without usp metadata, e.g. dit_xl_2")
    arg("--out", help="output folder (default: <run>/samples_<N>)")
    arg("--num-samples", type=int, default=64)
    arg("--seed", type=int, default=0)
    arg("--balanced", action="store_true", help="labels i %% num_classes instead of random labels")
    arg("--batch-size", type=_positive_int, help="samples per batch and rank (default: the recipe's train.eval_batch)")
    arg("--grid", type=int, default=64, help="images in the PNG grid")

    arg = command("evaluate", "FID, sFID, IS, precision, recall with ADM's definitions",
                  "usp evaluate VIRTUAL_imagenet256_labeled.npz samples_50000.npz --out metrics.json")
    arg("ref", help="ADM reference batch (.npz with arr_0 and/or mu, sigma, mu_s, sigma_s)")
    arg("samples", help="samples .npz (arr_0 uint8 N×H×W×3)")
    arg("--out", help="write the metrics as JSON here")
    arg("--inception-weights", help="local FID Inception weights (pt_inception-2015-12-05)")
    arg("--batch-size", type=int, default=50)
    arg("--device", help="default: cuda when there is one, else cpu")

    arg = command("demo", "the whole method on Fashion-MNIST (or --data DIR) on one CPU, with a report",
                  "usp demo --out demo_out   # resumable: finished stages are skipped",
                  "usp demo --data my_images --quick --out my_demo    # the whole pipeline and report on my_images",
                  parents=[tree])
    arg("--out", default="demo_out", help="output folder (report.md, PNGs, runs)")
    arg("--data", help="your ImageFolder tree DIR/{train,val}/<class>/<image> instead of Fashion-MNIST")
    arg("--quick", action="store_true", help="tiny budgets: checks the whole pipeline in minutes")
    arg("--full", action="store_true", help="the reproduction (about an hour on 2 CPU cores): DiT and SiT, 1 000 steps")
    arg("--seed", type=int, default=0)

    arg = command("init", "scan an ImageFolder tree and write a recipe set for it",
                  "usp init --data my_images --out my_usp   # scan my_images/{train,val}/<class>/, write recipes",
                  parents=[tree])
    arg("--data", required=True, help="DIR/{train,val}/<class>/<image> (ImageNet layout)")
    arg("--out", help="folder for recipes/ and runs (default: usp_<data folder name>)")

    arg = command("list", "models, latent spaces and shipped recipes, one line each", "usp list recipes")
    arg("what", nargs="?", choices=("models", "latent-spaces", "recipes", "all"), default="all")

    arg = command("reference", "an ADM-format reference batch (ADM centre crop) from an image folder",
                  "usp reference my_images/val --out ref.npz --image-size 32")
    arg("folder", help="a folder of images, searched recursively")
    arg("--out", required=True, help="the .npz to write (arr_0 uint8 N×H×W×3)")
    arg("--image-size", type=int, default=256, help="side of the ADM centre crop (default 256)")
    arg("--num", type=int, help="a random subset of this many images (default: all)")
    arg("--seed", type=int, default=0)

    arg = command("fetch", "download the hub assets of recipes (VAE, Inception) for an offline machine",
                  "usp fetch pretrain/vit_b_2_sdvae_224 --cache usp_assets   # with network, for offline jobs")
    arg("recipes", nargs="+", help="recipes (paths or shipped names) whose assets to download")
    arg("--cache", required=True, help="one folder for everything (copy it to the offline machine)")
    arg("--no-inception", action="store_true", help="skip the FID Inception weights")

    arg = command("compare-run", "a run against a reference: loss, lr, FD side by side; where it diverges",
                  "usp compare-run demo_out/runs/fmnist-sit-usp docs/demo/reference/sit_usp   # exit status 1 when "
                  "the run leaves the reference's band")
    arg("run", help="a run folder (holding log.jsonl) or its log.jsonl")
    arg("reference", help="a run folder, a log.jsonl, or a folder of run folders (several seeds: their envelope)")
    arg("--loss-tol", type=_fraction, help="relative loss tolerance around the band (default 0.05)")
    arg("--fd-tol", type=_fraction, help="relative FD tolerance, on top of 2 × the bootstrap error (default 0.10)")
    arg("--patience", type=_positive_int, default=2, help="logged steps in a row outside the band that leave it")
    arg("--skip", type=_fraction, help="fraction of the steps shown, not judged: the initial transient (default 0.2)")

    arg = command("reconstruct", "the restoration figure: original | masked | reconstruction",
                  "usp reconstruct runs/fmnist-pretrain/checkpoints/weights_0000200.safetensors --out restore.png",
                  parents=[weights])
    arg("--out", default="reconstruction.png")
    arg("--num-images", type=int, default=8)
    arg("--mask-ratio", type=float, default=0.75)
    arg("--seed", type=int, default=0)

    arg = command("export", "weights -> a diffusers, timm or Hub folder (with a model card); no upload",
                  "usp export runs/fmnist-sit-usp --to hub sit_hub   # diffusers / timm folder + README.md model card")
    arg("weights", help="weights_*.safetensors of a usp run, or its run folder (the latest)")
    arg("--to", required=True, choices=("diffusers", "timm", "hub"),
        help="diffusers: DiT -> DiTPipeline folder, SiT -> transformer + scheduler; timm: a USP encoder (pretrain, "
             "probe, classify) -> VisionTransformer; hub: either, plus the usp weights, recipe and model card")
    arg("out", help="the new folder to write")
    arg("--license", default="other", help="the model card's license metadata (default: other)")
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return parser


def _checked(kind, test, message: str):
    def parse(text: str):
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"{message}, got {text}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "must be an integer >= 1")
_unit_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1] (0 = data, 1 = noise)")
_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "must be a fraction in [0, 1), e.g. 0.05 for 5 %")


def main(argv: list[str] | None = None) -> None:
    # Before torch loads its thread pools: on a CPU shared with other processes, spinning OpenMP/OpenBLAS
    # waiters steal the cores the working threads need (2-4x slower steps measured here). Explicit settings win.
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
        (dry_run if args.dry_run else call)(args)
    except (ValueError, FileNotFoundError, FileExistsError, RunError) as err:
        if args.debug or os.environ.get("USP_DEBUG") == "1":
            raise
        message = " ".join(str(err).split())  # one line, whatever the library put in it
        print(f"error: {message} (traceback: --debug or USP_DEBUG=1)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

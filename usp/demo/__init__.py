"""The embedded default: `usp demo` runs the whole method on Fashion-MNIST on one CPU through the same
recipes, engine and commands as the ImageNet runs (`pipeline.py`), or with `--data DIR` on the user's image tree
from the recipes `usp init` writes (`own_data.py`), and writes a report built from the results (`report.py`, with
the USP-vs-scratch verdict of `verdict.py`).

May import: train, sample, evaluate, latent, models, diffusion, data, run, config, recipe_tools (everything
below it); never cli.
"""

"""The embedded default: `usp demo` runs the whole method on Fashion-MNIST on one CPU through the same
recipes, engine and commands as the ImageNet runs (`pipeline.py`), and writes a report (`report.py`).

May import: train, sample, evaluate, latent, models, diffusion, data, run, config (everything below it); never cli.
"""

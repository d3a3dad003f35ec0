"""Sampling: classifier-free-guided sampling of a DiT/SiT with per-sample seeds (`guided.py`: pure
functions of a model, a sampler and seeds, so a sample set does not depend on batch size or GPU count),
and the `usp sample` command (`run.py`: the generator of a recipe, loaded from a weights file read once;
sharded over torchrun ranks; ADM's NPZ and a PNG grid).

May import: config, run, models, diffusion, data, latent. Never train (generation training imports
`build_generator` from here), evaluate, demo or cli.
"""

"""Sampling: classifier-free-guided sampling of a DiT/SiT with per-sample seeds (`guided.py`: pure
functions of a model, a sampler and seeds, so a sample set does not depend on batch size or GPU count),
and the `usp sample` command (`run.py`: load a checkpoint, shard over torchrun ranks, write ADM's NPZ).

guided.py may import config, models, diffusion, data; run.py may also import latent and train.
"""

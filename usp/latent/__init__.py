"""The latent spaces (one table of channels, downsampling factor and scale per space: SD-VAE, KL-16, the
small f4 VAE), encode/decode, the memory-mapped cache of VAE moments, and `LatentData`, the dataset every
latent task reads (cached moments with a per-sample flip, or images encoded on the fly).

May import: `usp.config`, `usp.run` (the autocast table), `usp.data`; never models, training, sampling or
evaluation.
"""

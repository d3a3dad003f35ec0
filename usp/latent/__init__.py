"""The latent spaces (one table of channels, downsampling factor and scale per space: SD-VAE, KL-16, the
small f4 VAE), encode/decode, the memory-mapped cache of VAE moments, and `LatentData`, the dataset every
latent task reads (cached moments with a per-sample flip, or images encoded on the fly).

May import: config, run (the weights reader), data, models (the registry and REPA's teacher, whose tokens are
cached beside the latents); never diffusion, training, sampling or evaluation.
"""

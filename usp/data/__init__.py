"""Images in: ImageFolder trees (validated up front), Fashion-MNIST from Debian's IDX files, and the
resumable sampler whose per-sample seeds make a run independent of worker count and restarts.

May import: torch, torchvision, PIL, numpy and `usp.config`; nothing above (no latent, model or training code).
"""

"""usp: Unified Self-Supervised Pretraining (USP, Chu, Li, Wang; ICCV 2025) for image generation and understanding.

The folders follow the method: `latent/` (VAE latent spaces and the cache), `models/` (the registry of
named networks), `diffusion/` (DDPM and transport objectives and samplers), `run/` (the run folder every
stage hands the next: checkpoints, the weights reader, the log, the runtime), `train/` (the one engine and
its tasks), `sample/` (guided sampling to ADM NPZ), `evaluate/` (FID and friends, probes), `demo/` (the
embedded default). `cli.py` parses and calls; `config/` holds the typed recipes (sections.py) and their
loading (loading.py).

May import: nothing (a package's own docstring says what it may import). The package itself imports nothing
at import time, so `import usp` is cheap; it defines the errors a user can fix (a bad
checkpoint, a full disk, a busy run folder, a diverged run), which the CLI prints as one `error:` line
naming the problem and the fix, with exit code 2 (`--debug` shows the traceback).
"""


class RunError(RuntimeError):
    pass


class CheckpointError(RunError):
    pass


class DiskFullError(RunError):
    pass


class RunLocked(RunError):
    pass

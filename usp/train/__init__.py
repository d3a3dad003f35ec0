"""Training: the one engine (`engine.py`: distribution, AMP, accumulation, clipping, EMA, logging,
checkpoints, exact resume), optimisers and schedules (`optim.py`), the checkpoint format (`checkpoint.py`),
and the tasks it trains (`tasks/`: pretrain, vae, generation, classification).

May import: config, data, latent, models, diffusion, evaluate, sample.guided. Never demo or cli.
"""

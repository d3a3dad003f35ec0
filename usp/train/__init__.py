"""Training: the one engine (`engine.py`: distribution, AMP, accumulation, clipping, EMA, logging,
checkpoints, exact resume), optimisers and schedules (`optim.py`), what a run shows as it goes (`log.py`,
`curve.py`), and the tasks it trains (`tasks/`: pretrain, vae, generation, classification). The run folder's
formats (checkpoints, weights, log.jsonl, runtime) are `usp.run`'s.

May import: config, run, data, latent, models, diffusion, evaluate, sample. Never demo or cli.
"""

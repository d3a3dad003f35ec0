"""Probes of diffusion backbones: how linearly separable a DiT/SiT's hidden tokens are (REPA's measure).

Features of an image: its clean latent x (posterior mean, unflipped) is noised to a noise level s ∈ [0, 1]
with a fixed per-image noise, the generator runs at that time with the label embedding off (the null,
CFG-unconditional label, so no class information enters), and the tokens after block k are mean-pooled
(before the final adaLN layer). Logistic regression and k-NN then read the pooled features, as
`usp probe --fast` does for an encoder. Noise level s maps to the model's time by the generator's objective
(`usp.diffusion.build_objective`, docs/conventions.md): DDPM t = round(s·(T − 1)) (t = 0 is data); transport
t = 1 − s (t = 1 is data).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from usp.config import Config
from usp.diffusion import Objective, build_objective
from usp.evaluate.probes import fast_protocol, knn_accuracy, logistic_regression
from usp.latent.data import LatentData
from usp.models.dit import DiT


@torch.no_grad()
def backbone_features(model: DiT, x_t: torch.Tensor, t: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """x_t: (N, C, H, W) noised latents, t: (N,) model time -> {k: (N, D) mean of the tokens after block k}.

    Blocks count from 1. The condition is the time embedding plus the null label's embedding when the
    model has one (trained with class dropout), else the time embedding alone."""
    if not blocks or min(blocks) < 1 or max(blocks) > model.depth:
        raise ValueError(f"blocks must lie in 1..{model.depth} (this model's depth), got {list(blocks)}")
    tokens = model.x_embedder(x_t) + model.pos_embed  # (N, L, D)
    c = model.t_embedder(t)  # (N, D)
    if model.y_embedder.dropout_prob > 0:
        null = torch.full((len(x_t),), model.null_label, dtype=torch.long, device=x_t.device)
        c = c + model.y_embedder(null, False)
    out = {}
    for k, block in enumerate(model.blocks, start=1):
        tokens = block(tokens, c)  # (N, L, D)
        if k in blocks:
            out[k] = tokens.mean(dim=1)  # (N, D)
        if k == max(blocks):
            break
    return out


@torch.no_grad()
def split_features(model: DiT, objective: Objective, data: LatentData, blocks: Sequence[int],
                   noise_levels: Sequence[float], seed: int, batch_size: int = 500
                   ) -> tuple[dict[tuple[int, float], torch.Tensor], torch.Tensor]:
    """{(block, noise level): (N, D)} pooled features of every item of a split, and its labels (N,).
    The noise of item i is drawn from `seed + i`, so it is the same at every noise level and batch size."""
    feats: dict[tuple[int, float], list[torch.Tensor]] = {(k, s): [] for k in blocks for s in noise_levels}
    labels, index = [], 0
    for batch in data.eval_batches(list(range(len(data.dataset))), batch_size):
        x = data.latents(batch)  # (B, C, h, w)
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + index + i))
                             for i in range(len(x))])
        index += len(x)
        for s in noise_levels:
            x_t, t = objective.noised(x, noise, s)
            for k, f in backbone_features(model, x_t, t, blocks).items():
                feats[(k, s)].append(f)
        labels.append(batch["label"])
    return {key: torch.cat(value) for key, value in feats.items()}, torch.cat(labels)


def probe_backbone(model: DiT, config: Config, weights: str | Path, blocks: Sequence[int] = (2, 4),
                   noise_levels: Sequence[float] = (0.1, 0.5)) -> dict:
    """Logistic regression and k-NN top-1 of a DiT/SiT's pooled block features, per block and noise level, on
    the recipe's train / eval splits (a latent cache or images encoded on the fly). `model` and `config` are a
    loaded generator and its recipe (`usp.sample.run.load_generator`); `weights` names where they came from."""
    start = time.perf_counter()
    torch.manual_seed(config.run.seed)
    train_data = LatentData(config, config.data.split, augment=False)
    test_data = LatentData(config, config.data.eval_split, augment=False)
    objective, batch = build_objective(config.generation), config.train.eval_batch
    train_f, train_y = split_features(model, objective, train_data, blocks, noise_levels, config.run.seed, batch)
    test_f, test_y = split_features(model, objective, test_data, blocks, noise_levels, config.run.seed + 10**7,
                                    batch)
    rows = []
    for k in blocks:
        for s in noise_levels:
            logistic = logistic_regression(train_f[(k, s)], train_y, test_f[(k, s)], test_y)
            knn = knn_accuracy(train_f[(k, s)], train_y, test_f[(k, s)], test_y)
            rows.append({"block": k, "noise_level": s, "model_t": objective.model_time(s),
                         "logistic_top1": logistic["top1"], "knn_top1": knn["top1"]})
    features = {"layer": f"output of DiT block k of {model.depth} (rows), before the final layer",
                "pooling": "mean of all tokens", "norm": "none (raw residual stream)",
                "input": f"latent noised to level s (rows; 0 = data, 1 = noise) with fixed per-image noise, "
                         f"{objective.name} time convention",
                "label": "null (CFG-unconditional) label" if model.y_embedder.dropout_prob > 0 else "none"}
    return {"weights": str(weights), "init": config.model.init or "random", "rows": rows,
            "seconds": time.perf_counter() - start,
            "protocol": fast_protocol(features, len(train_y), config.model.init)}


def format_table(result: dict) -> str:
    """The rows of `probe_backbone` as a Markdown table."""
    lines = ["| block | noise level s | model t | logistic top-1 | k-NN top-1 |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['block']} | {r['noise_level']:g} | {r['model_t']:g} | {r['logistic_top1']:.2f} | "
              f"{r['knn_top1']:.2f} |" for r in result["rows"]]
    return "\n".join(lines)


def probe_command(model: DiT, config: Config, weights: str | Path, blocks: Sequence[int], noise_levels: Sequence[float],
                  out: str | Path | None = None) -> None:
    """`usp probe-backbone WEIGHTS` once the generator is loaded: `probe_backbone`, printed as JSON and as a table,
    and written to `out` (JSON) if given."""
    result = probe_backbone(model, config, weights, blocks=blocks, noise_levels=noise_levels)
    print(json.dumps(result, indent=1))
    print(format_table(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))

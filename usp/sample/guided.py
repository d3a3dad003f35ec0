"""Sampling from DiT / SiT generators: guided model functions, per-sample seeds, grids and ADM NPZs.

Every sample i is drawn from its own seed (`seed + i`): its label (when not class-balanced), its
initial noise and every stochastic step's noise, so a sample set does not depend on the batch size or
the number of processes. `usp sample` shards indices across torchrun ranks in fixed chunks, each
written to its own file, and skips chunks already on disk (resumption).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from usp.config import GenerationConfig
from usp.diffusion import build_objective
from usp.diffusion.time import in_sit_time
from usp.models.dit import DiT
from usp.run.runtime import autocast_dtype


def guided_model_fn(model: DiT, labels: torch.Tensor, cfg_scale: float, guided_channels: int | None,
                    amp: torch.dtype | None = None, *, interval: tuple[float, float] | None = None,
                    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None, time: str = "sit",
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn(x, t) for samplers: conditional on `labels`, with classifier-free guidance when scale > 1.

    Guidance is off for cfg_scale ≤ 1, as in DiT's, SiT's, REPA's and LightningDiT's samplers (`using_cfg =
    cfg_scale > 1`). time: the time the network was trained in ('sit' or 'repa', usp.diffusion.time); the sampler
    always speaks SiT time, the wrapped network its own.

    interval: guide only the calls whose noise level `noise_level(t)` (the objective's map from the sampler's
    time, 1 = pure noise, 0 = data) lies in [low, high], both ends included (REPA's check); every other call
    runs the conditional model alone, on the batch as given, without the unconditional half (Kynkäänniemi et al.
    2024, "guidance interval"). None guides every call.
    amp: run the network under autocast of this dtype and hand the sampler float32 (its state and noise stay
    float32, so only the network's rounding changes); None runs it as called.
    """
    if interval is not None:
        low, high = interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval must be [low, high] with 0 <= low <= high <= 1, got {interval}")
        if noise_level is None:
            raise ValueError("a guidance interval needs the objective's noise_level (its time -> noise level map)")
    null = torch.full_like(labels, model.null_label) if cfg_scale > 1.0 else None
    net = in_sit_time(model, time)
    net_cfg = in_sit_time(model.forward_with_cfg, time) if null is not None else None

    def cfg(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor) -> torch.Tensor:
        return net_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), cfg_scale,
                       guided_channels)[: x.shape[0]]

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if null is None:
            return net(x, t, labels)
        if interval is None:
            return cfg(x, t, labels, null)
        level = noise_level(t)
        inside = (level >= interval[0]) & (level <= interval[1])  # (N,) bool
        # One host sync per call (the samplers give every sample the same t): the branch sets the batch size.
        if bool(inside.all()):
            return cfg(x, t, labels, null)
        if not bool(inside.any()):
            return net(x, t, labels)
        out = torch.empty((x.shape[0], model.num_output_channels, *x.shape[2:]), device=x.device, dtype=x.dtype)
        out[inside] = cfg(x[inside], t[inside], labels[inside], null[inside]).to(x.dtype)
        out[~inside] = net(x[~inside], t[~inside], labels[~inside]).to(x.dtype)
        return out

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # no autocast object at all for fp32: devices without autocast (meta, some backends) refuse even a disabled one
        with contextlib.nullcontext() if amp is None else torch.autocast(x.device.type, dtype=amp):
            out = guided(x, t)
        return out if amp is None else out.float()

    return fn


def sample_labels(indices: list[int], seed: int, num_classes: int, balanced: bool) -> torch.Tensor:
    if balanced:
        return torch.tensor([i % num_classes for i in indices])
    return torch.tensor([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(seed + i)))
                         for i in indices])


def sample_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample on the sampling device, seeded `seed + 1_000_003` (≠ the label's stream).

    Each sample's noise then depends on its seed only (not on the batch size or the number of processes), and
    is drawn where it is used, without a host-to-device copy per step. A CPU and a CUDA generator give different
    numbers for one seed, so a sample set is reproducible per device type, not across device types.
    """
    return [torch.Generator(device=device).manual_seed(s + 1_000_003) for s in seeds]


@torch.no_grad()
def sample_latents(model: DiT, gen: GenerationConfig, labels: torch.Tensor, seeds: list[int],
                   latent_shape: tuple[int, int, int], progress: bool = False) -> torch.Tensor:
    """Draw one latent (C, h, w) per label, sample i from `seeds[i]`. Returns (N, C, h, w)."""
    device = next(model.parameters()).device
    generators = sample_generators(seeds, device)
    noise = torch.stack([torch.randn(latent_shape, generator=g, device=device) for g in generators])
    objective = build_objective(gen)
    model_fn = guided_model_fn(model, labels.to(device), gen.cfg_scale, gen.guided_channels,
                               autocast_dtype(gen.amp, device), interval=gen.guidance_interval,
                               noise_level=objective.noise_level, time=gen.time)
    return objective.sample(model_fn, noise, generator=generators, progress=progress)


def sample_images(model: DiT, decode: Callable[[torch.Tensor], torch.Tensor], gen: GenerationConfig,
                  indices: list[int], seed: int, num_classes: int, balanced: bool, latent_shape: tuple[int, int, int],
                  batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W, 3) and labels (N,) for sample indices `indices`."""
    from usp.data.images import to_uint8

    images, labels = [], []
    for start in tqdm(range(0, len(indices), batch_size), disable=not progress, desc="sample", unit="batch"):
        chunk = indices[start : start + batch_size]
        y = sample_labels(chunk, seed, num_classes, balanced)
        z = sample_latents(model, gen, y, [seed + i for i in chunk], latent_shape)
        images.append(to_uint8(decode(z)))
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def sample_sharded(model: DiT, decode, gen: GenerationConfig, out_dir: Path, num_samples: int, seed: int,
                   num_classes: int, balanced: bool, latent_shape: tuple[int, int, int], rank: int = 0,
                   world_size: int = 1, chunk_size: int = 1000, batch_size: int = 64, progress: bool = True) -> Path:
    """Write chunk files of `chunk_size` samples (chunks assigned round-robin to ranks, finished ones
    skipped), then — on rank 0, once all exist — merge them into ADM's NPZ (`arr_0` uint8 N×H×W×3,
    `arr_1` labels). Returns the NPZ path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [list(range(s, min(s + chunk_size, num_samples))) for s in range(0, num_samples, chunk_size)]
    for k in range(rank, len(chunks), world_size):
        path = out_dir / f"chunk_{k:05d}.npz"
        if path.exists():
            continue
        images, labels = sample_images(model, decode, gen, chunks[k], seed, num_classes, balanced, latent_shape,
                                       batch_size, progress)
        tmp = out_dir / f"chunk_{k:05d}.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(path)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    final = out_dir / f"samples_{num_samples}.npz"
    if rank == 0:
        parts = [np.load(out_dir / f"chunk_{k:05d}.npz") for k in range(len(chunks))]
        images = np.concatenate([p["images"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts])
        tmp = out_dir / "samples.tmp.npz"
        np.savez(tmp, arr_0=images, arr_1=labels)
        tmp.replace(final)
    return final


def save_grid(images: np.ndarray, path: Path, nrow: int) -> None:
    """uint8 (N, H, W, 3) -> one PNG, `nrow` images per row."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    save_image(tensor, path, nrow=nrow, padding=1)

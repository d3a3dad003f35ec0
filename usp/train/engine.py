"""One training loop for every task: pretraining, DiT/SiT fine-tuning, linear probe, fine-tuning.

The engine owns distribution (torchrun DDP: NCCL on GPU, gloo on CPU), AMP, gradient accumulation,
clipping, the per-iteration lr schedule, EMA, logging and atomic checkpoints with exact resume.
A task (usp/train/tasks.py) supplies the model, the dataset, the per-sample randomness and
`loss(model, batch) -> dict`; it knows nothing of this loop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from usp.config import Config, save_config
from usp.data.sampler import ResumableSampler, SeededDataset
from usp.train import checkpoint as ckpt
from usp.train.optim import apply_lr, build_optimizer, lr_at, param_groups

log = logging.getLogger("usp")


# --------------------------------------------------------------------------------------------
# Runtime set-up (the one place that touches process-wide state)
# --------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun; pick the device; set backend flags."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the standard for DiT/MAE training
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    return Runtime(rank, world_size, torch_device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. auto: bf16 on GPU, fp32 on CPU (CPU autocast is slower than fp32 here)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema ← decay·ema + (1−decay)·θ


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def read_log(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """A run's log.jsonl as (training records, evaluations flattened to {"step", **metrics})."""
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [{"step": r["step"], **r["eval"]} for r in rows if "eval" in r]


class NonFiniteLoss(RuntimeError):
    pass


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _batches(loader: DataLoader, sampler: ResumableSampler, epoch: int, start: int) -> Iterator[dict]:
    while True:
        sampler.set_epoch(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


def train(config: Config, task, runtime: Runtime | None = None, resume: str | None = "auto") -> dict:
    """Train `task` under `config`. resume: 'auto' (latest checkpoint in the run dir, if any),
    None (start fresh; refuses to overwrite an existing run), or a path to a state file."""
    rt = runtime or setup_runtime(config.run.device)
    cfg, run_dir = config.train, config.run_dir
    ckpt_dir = run_dir / "checkpoints"
    state_path = ckpt.latest_state(ckpt_dir) if resume == "auto" else (Path(resume) if resume else None)
    if resume is None and ckpt.latest_state(ckpt_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass --resume auto to continue, "
                              "or choose another run.name")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    torch.manual_seed(config.run.seed)
    model = task.model.to(rt.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay else None
    groups = task.param_groups() if hasattr(task, "param_groups") else param_groups(model, config.optim.weight_decay)
    optimizer = build_optimizer(config.optim.name, groups, lr=config.lr, betas=config.optim.betas,
                                momentum=config.optim.momentum, fused=config.optim.fused)
    amp_dtype = autocast_dtype(cfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    train_model = model
    if rt.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    # Batch arithmetic: progress is in optimiser steps of `global_batch` images.
    micro_batch, rem = divmod(cfg.global_batch, rt.world_size * cfg.accum_steps)
    if rem or micro_batch == 0:
        raise ValueError(f"train.global_batch={cfg.global_batch} must be divisible by world size {rt.world_size} "
                         f"× train.accum_steps={cfg.accum_steps}")
    dataset = task.train_set
    steps_per_epoch = (len(dataset) // rt.world_size * rt.world_size) // cfg.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one global batch of {cfg.global_batch}; "
                         "lower train.global_batch")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup_steps = min(round(config.optim.warmup_epochs * steps_per_epoch), total_steps)

    step = 0
    if state_path is not None:
        state = ckpt.load_state(state_path)
        ckpt.load_strict(model, state["model"], str(state_path))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ckpt.load_strict(ema, state["ema"], str(state_path))
        torch.set_rng_state(state["rng_cpu"])
        if rt.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step = state["step"]
        log.info(f"resumed from {state_path} at step {step}")

    sampler = ResumableSampler(len(dataset), config.run.seed, rt.rank, rt.world_size)
    workers = config.data.num_workers
    loader = DataLoader(
        SeededDataset(dataset, getattr(task, "extras", None)), batch_size=micro_batch, sampler=sampler,
        num_workers=workers, pin_memory=rt.device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator(),  # keeps the global RNG untouched
    )
    # Position in the data stream: each optimiser step consumes `accum` micro-batches on every rank.
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    batches = _batches(loader, sampler, epoch, done_in_epoch * cfg.accum_steps * micro_batch)

    writer = None
    if rt.is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    log_file = open(run_dir / "log.jsonl", "a") if rt.is_main else None
    log.info(f"{config.run.task}: {total_steps} steps × {cfg.global_batch} images "
             f"({steps_per_epoch} steps/epoch, world {rt.world_size}, accum {cfg.accum_steps}), "
             f"peak lr {config.lr:.3g}"
             + (f" (blr {config.optim.blr} × {cfg.global_batch}/256)" if config.optim.lr is None else "")
             + f", device {rt.device}")

    def save(at_step: int) -> None:
        if not rt.is_main:
            return
        state = {"step": at_step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        if rt.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        ckpt.save_state(ckpt_dir, at_step, state)
        meta = {"task": config.run.task, "model": config.model.name, "step": at_step,
                "ema": ema is not None, "config": config.to_dict()}
        ckpt.save_weights(ckpt_dir, at_step, (ema or model).state_dict(), meta)
        ckpt.prune(ckpt_dir, cfg.keep_last)

    running: dict[str, torch.Tensor] = {}
    count, seen_finite_at, last_time = 0, step, time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not (rt.is_main and cfg.progress), unit="step",
               dynamic_ncols=True)
    history: list[dict] = []
    model.train()
    while step < total_steps:
        lr = lr_at(step, base_lr=config.lr, warmup_steps=warmup_steps, total_steps=total_steps,
                   min_lr=config.optim.min_lr, schedule=config.optim.schedule)
        apply_lr(optimizer, lr)
        for micro in range(cfg.accum_steps):
            batch = _to_device(next(batches), rt.device)
            sync = micro == cfg.accum_steps - 1 or rt.world_size == 1
            no_sync = not sync and hasattr(train_model, "no_sync")
            context = train_model.no_sync() if no_sync else contextlib.nullcontext()
            with context, torch.autocast(rt.device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
                out = task.loss(train_model, batch)
            scaler.scale(out["loss"] / cfg.accum_steps).backward()
            for key, value in out.items():  # accumulate on device: no host sync per step
                running[key] = running.get(key, 0.0) + value.detach().float()
            count += 1
        if config.optim.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, cfg.ema_decay)
        step += 1
        bar.update(1)

        at_log = step % cfg.log_every == 0 or step == total_steps
        at_ckpt = step % cfg.ckpt_every == 0 or step == total_steps
        if at_log or at_ckpt:
            means = {k: v / count for k, v in running.items()}
            if rt.world_size > 1:
                stacked = torch.stack(list(means.values()))
                dist.all_reduce(stacked)
                means = dict(zip(means, stacked / rt.world_size))
            values = {k: float(v) for k, v in means.items()}
            if not all(math.isfinite(v) for v in values.values()):
                bar.close()
                raise NonFiniteLoss(
                    f"non-finite loss {values} between steps {seen_finite_at} and {step}; the run stopped and the "
                    f"last good checkpoint in {ckpt_dir} is intact. Lower the lr or enable optim.clip_grad."
                )
            seen_finite_at = step
            now = time.perf_counter()
            record = {"step": step, "epoch": step / steps_per_epoch, "images_seen": step * cfg.global_batch,
                      "lr": lr, **values, "steps_per_s": count / cfg.accum_steps / max(now - last_time, 1e-9)}
            history.append(record)
            running, count, last_time = {}, 0, now
            if rt.is_main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if at_ckpt:
            save(step)
        if hasattr(task, "evaluate") and (
            (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
        ):
            with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
                metrics = task.evaluate(ema or model, step, run_dir, rt, final=step == total_steps)
            if rt.is_main and metrics:
                log_file.write(json.dumps({"step": step, "eval": metrics}) + "\n")
                log_file.flush()
                for key, value in metrics.items() if writer is not None else ():
                    if isinstance(value, (int, float)):
                        writer.add_scalar(f"eval/{key}", value, step)
                log.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                        if isinstance(v, float)))
            model.train()
    bar.close()
    if log_file is not None:
        log_file.close()
        from usp.train.curve import write_loss_curve

        write_loss_curve(run_dir)
    if writer is not None:
        writer.close()
    return {"step": step, "history": history, "model": model, "ema": ema}

"""One training loop for every task: pretraining, DiT/SiT fine-tuning, VAE, linear probe, fine-tuning.

`train` reads top to bottom: lock the run folder, plan the steps, build the `TrainState` (state.py), resume
it, then step / log / checkpoint / evaluate until the last step, and mark the run done only once its
end-of-run outputs exist. The engine owns AMP, gradient accumulation, clipping, the non-finite guard, the
per-iteration lr schedule and EMA; the process set-up is in dist.py, the record in log.py, checkpoint
files in checkpoint.py. A task (usp/train/tasks/) supplies the model, the dataset, the per-sample
randomness and `loss(model, batch) -> dict` (the `Task` protocols below); it knows nothing of this loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from usp import RunError
from usp.config import Config, TrainConfig, save_config
from usp.data.sampler import DataStream, ResumableSampler, SeededDataset
from usp.run import checkpoint as ckpt
from usp.run.checkpoint import RunLock
from usp.run.log import read_log
from usp.run.runtime import (
    Runtime,
    autocast_dtype,
    barrier,
    describe_precision,
    mean_over_ranks,
    setup_runtime,
    wrap_model,
)
from usp.train.flops import device_peak_flops, mfu, training_flops_per_sample
from usp.train.log import RunLog
from usp.train.memory import estimate_run
from usp.train.optim import apply_lr, build_optimizer, lr_at, param_groups
from usp.train.state import TrainState, update_ema

__all__ = ["Runtime", "setup_runtime", "autocast_dtype", "read_log", "update_ema", "train", "NonFiniteLoss", "Task"]

log = logging.getLogger("usp")


# --------------------------------------------------------------------------------------------
# What the engine needs of a task
# --------------------------------------------------------------------------------------------


class Task(Protocol):
    model: nn.Module
    train_set: Dataset

    def loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class HasExtras(Protocol):
    def extras(self) -> dict: ...  # per-sample randomness, drawn under the sample's seed


@runtime_checkable
class ServesBatches(Protocol):  # its own micro-batches of the sampler's items (None: the DataLoader's)
    def train_batches(self, sampler: ResumableSampler, micro_batch: int) -> Iterable[dict] | None: ...


@runtime_checkable
class HasParamGroups(Protocol):
    def param_groups(self) -> list[dict]: ...


@runtime_checkable
class ExportsWeights(Protocol):
    def export_weights(self, model: nn.Module) -> dict[str, torch.Tensor]: ...  # what the weights file holds


@runtime_checkable
class Evaluates(Protocol):
    def evaluate(self, model: nn.Module, step: int, run_dir: Path, runtime: Runtime, final: bool) -> dict: ...


class NonFiniteLoss(RunError):
    """Training diverged (non-finite gradients, loss or weights) and recovery was off or failed."""


class _Diverged(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    """Batch arithmetic: progress is in optimiser steps of `global_batch` images."""

    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr_factor: float = 1.0  # < 1 when a floor on steps stretched the schedule (min_steps)

    @classmethod
    def of(cls, cfg: TrainConfig, warmup_epochs: float, dataset_len: int, rt: Runtime, min_steps: int = 0) -> BatchPlan:
        """min_steps: a floor on the steps of an epoch-based schedule. A small dataset's few large steps (the
        paper's probe at batch 1 024 on 1 500 images: 10 steps) become `min_steps` finer ones: the schedule is
        stretched (warm-up included) and the lr scaled by natural / min_steps, so the summed lr — how far the
        weights travel under LARS or Adam, whose steps scale with lr — is the recipe's."""
        micro_batch, rem = divmod(cfg.global_batch, rt.world_size * cfg.accum_steps)
        if rem or micro_batch == 0:
            raise ValueError(f"train.global_batch={cfg.global_batch} must be divisible by world size "
                             f"{rt.world_size} × train.accum_steps={cfg.accum_steps}")
        steps_per_epoch = (dataset_len // rt.world_size * rt.world_size) // cfg.global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch of "
                             f"{cfg.global_batch}; lower train.global_batch")
        natural = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        total = natural if cfg.max_steps else max(natural, min_steps)
        warmup = min(round(warmup_epochs * steps_per_epoch * total / natural), total)
        return cls(micro_batch, steps_per_epoch, total, warmup, natural / total)


def build_state(config: Config, task: Task, rt: Runtime, plan: BatchPlan) -> TrainState:
    torch.manual_seed(config.run.seed)
    model = task.model.to(rt.device)
    oc = config.optim
    groups = (task.param_groups() if isinstance(task, HasParamGroups)
              else param_groups(model, oc.weight_decay, official=oc.official_param_groups))
    optimizer = build_optimizer(oc.name, groups, lr=config.lr, betas=oc.betas, momentum=oc.momentum, fused=oc.fused)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=autocast_dtype(config.train.amp, rt.device) == torch.float16)
    sampler = ResumableSampler(len(task.train_set), config.run.seed, rt.rank, rt.world_size)
    workers = config.data.num_workers
    loader = task.train_batches(sampler, plan.micro_batch) if isinstance(task, ServesBatches) else None
    if loader is None:
        loader = DataLoader(
            SeededDataset(task.train_set, task.extras if isinstance(task, HasExtras) else None),
            batch_size=plan.micro_batch, sampler=sampler, num_workers=workers, pin_memory=rt.device.type == "cuda",
            drop_last=True, persistent_workers=workers > 0, generator=torch.Generator(),  # global RNG untouched
        )
    return TrainState.create(model, optimizer, scaler, DataStream(loader, sampler, plan.micro_batch),
                             config.train.ema_decay)


def restore(state: TrainState, ckpt_dir: Path, resume: str | None, rt: Runtime) -> None:
    """resume: 'auto' (the newest checkpoint that verifies, if any), None (fresh; refuses to overwrite), a path."""
    if resume is None:
        if ckpt.latest_state(ckpt_dir) is not None:
            raise FileExistsError(f"{ckpt_dir.parent} already holds checkpoints; pass --resume auto to continue, "
                                  "or choose another run.name")
        return
    if not rt.is_main:
        barrier(rt)  # rank 0 first: it alone moves unreadable checkpoints aside
    found = ckpt.load_latest_state(ckpt_dir) if resume == "auto" else (Path(resume), ckpt.load_state(Path(resume)))
    if rt.is_main:
        barrier(rt)
    if found is None:
        return
    path, saved = found
    state.load_state_dict(saved, str(path))
    log.info(f"resumed from {path} at step {state.step}")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# The parts of one iteration
# --------------------------------------------------------------------------------------------


class Loop:
    """The state of a running loop that is not saved: the wrapped model, the data iterator, running means,
    the count of consecutive skipped steps, the record."""

    def __init__(self, config: Config, task: Task, rt: Runtime, plan: BatchPlan, state: TrainState):
        self.config, self.cfg, self.task, self.rt, self.plan, self.state = config, config.train, task, rt, plan, state
        self.run_dir, self.ckpt_dir = config.run_dir, config.run_dir / "checkpoints"
        self.train_model = wrap_model(state.model, rt, self.cfg.compile)
        self.amp_dtype = autocast_dtype(self.cfg.amp, rt.device)
        self.batches = iter(state.stream)
        self.record = RunLog(self.run_dir, rt.is_main, start_step=state.step, total_steps=plan.total_steps,
                             tensorboard=self.cfg.tensorboard, progress=self.cfg.progress)
        self.history: list[dict] = []
        self.running: dict[str, torch.Tensor] = {}
        self.count, self.bad_run, self.rollbacks, self.lr, self.last_time = 0, 0, 0, 0.0, time.perf_counter()
        try:  # model FLOPs per image, for MFU beside throughput (the peak table knows CUDA devices, not CPUs)
            self.flops_per_sample = training_flops_per_sample(state.model, config.pretrain.mask_ratio)
        except TypeError:  # classifiers and the VAE: throughput only
            self.flops_per_sample = None
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
        self.peak_flops = device_peak_flops(rt.device, precision)
        oc = config.optim
        log.info(f"{config.run.task}: {plan.total_steps} steps × {self.cfg.global_batch} images "
                 f"({plan.steps_per_epoch} steps/epoch, world {rt.world_size}, accum {self.cfg.accum_steps}), "
                 f"peak lr {config.lr:.3g}" + (f" (blr {oc.blr} × {self.cfg.global_batch}/256)" if oc.lr is None
                                               else "") + f", device {rt.device}, "
                 + describe_precision(self.cfg.amp, rt.device)
                 + (f"; stretched to the floor of {plan.total_steps} steps (train.min_steps), lr × {plan.lr_factor:.3g}"
                    if plan.lr_factor != 1.0 else ""))

    def due(self, every: int, step: int) -> bool:
        return step > 0 and ((every and step % every == 0) or step == self.plan.total_steps)

    def eval_due(self, step: int) -> bool:
        return isinstance(self.task, Evaluates) and self.due(self.cfg.eval_every, step)

    def train_step(self) -> None:
        """One optimiser step over `accum_steps` micro-batches; skipped when the gradients are not finite."""
        state, cfg, rt = self.state, self.cfg, self.rt
        self.lr = lr_at(state.step, base_lr=self.config.lr * self.plan.lr_factor, warmup_steps=self.plan.warmup_steps,
                        total_steps=self.plan.total_steps, min_lr=self.config.optim.min_lr,
                        schedule=self.config.optim.schedule)
        apply_lr(state.optimizer, self.lr)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.accum_steps):
            batch = _to_device(next(self.batches), rt.device)
            no_sync = micro < cfg.accum_steps - 1 and rt.world_size > 1 and hasattr(self.train_model, "no_sync")
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext(), torch.autocast(
                    rt.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                out = self.task.loss(self.train_model, batch)
            state.scaler.scale(out["loss"] / cfg.accum_steps).backward()
            for key, value in out.items():  # accumulate on device: no host sync per micro-batch
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        stepped = apply_gradients(state, self.config.optim.clip_grad, cfg.ema_decay)
        state.step += 1
        self.record.bar.update(1)
        if stepped:
            for key, value in sums.items():
                self.running[key] = self.running.get(key, 0.0) + value
            self.count, self.bad_run = self.count + cfg.accum_steps, 0
            return
        state.skipped, self.bad_run = state.skipped + 1, self.bad_run + 1
        log.warning(f"step {state.step}: non-finite gradients; the step was skipped ({self.bad_run} in a row)")
        if self.bad_run >= cfg.max_skipped_steps:
            raise _Diverged(f"{self.bad_run} consecutive steps ({state.step - self.bad_run + 1}-{state.step}) had "
                            f"non-finite gradients (train.max_skipped_steps={cfg.max_skipped_steps})")

    def log_means(self) -> None:
        step, cfg = self.state.step, self.cfg
        values = mean_over_ranks({k: v / self.count for k, v in self.running.items()} if self.count else {}, self.rt)
        if not all(math.isfinite(v) for v in values.values()):
            raise _Diverged(f"a non-finite loss {values} up to step {step} although every gradient was finite")
        now = time.perf_counter()
        record = {"step": step, "epoch": step / self.plan.steps_per_epoch, "images_seen": step * cfg.global_batch,
                  "lr": self.lr, **values, "steps_per_s": self.count / cfg.accum_steps / max(now - self.last_time,
                                                                                             1e-9)}
        record["images_per_s"] = record["steps_per_s"] * cfg.global_batch
        if self.flops_per_sample is not None and self.peak_flops is not None:  # per device: world-size GPUs share
            record["mfu"] = mfu(record["images_per_s"] / self.rt.world_size, self.flops_per_sample, self.peak_flops)
        if self.state.skipped:
            record["skipped_steps"] = self.state.skipped
        self.history.append(record)
        self.running, self.count, self.last_time = {}, 0, now
        self.record.train(record)

    def checkpoint(self) -> None:
        """Weights file first, then the state (the commit), then pruning: every name on disk is a whole file,
        and only finite weights are ever written."""
        step, state = self.state.step, self.state
        if not state.finite():
            raise _Diverged(f"the weights became non-finite by step {step} although every gradient was finite "
                            f"(the update overflowed at lr {self.lr:.3g})")
        if not self.rt.is_main:
            return
        config = self.config
        meta = {"task": config.run.task, "model": config.model.name, "step": step, "ema": state.ema is not None,
                "config": config.to_dict()}
        exported = state.ema or state.model  # a task may leave training-only heads out of the weights file
        weights = self.task.export_weights(exported) if isinstance(self.task, ExportsWeights) else exported.state_dict()
        ckpt.save_weights(self.ckpt_dir, step, weights, meta)
        ckpt.save_state(self.ckpt_dir, step, state.state_dict())
        ckpt.prune(self.ckpt_dir, self.cfg.keep_last)

    def evaluate(self, step: int) -> None:
        with torch.random.fork_rng(devices=[self.rt.device] if self.rt.device.type == "cuda" else []):
            metrics = self.task.evaluate(self.state.ema or self.state.model, step, self.run_dir, self.rt,
                                         final=step == self.plan.total_steps)
        self.record.evaluation(step, metrics or {})
        self.state.model.train()

    def recover(self, err: _Diverged) -> None:
        """train.on_nonfinite: stop with a true message, or roll back to the newest finite checkpoint, keeping
        the data position so the batches that led here are skipped (at most 3 rollbacks per process)."""
        found = ckpt.load_latest_state(self.ckpt_dir) if self.cfg.on_nonfinite == "rollback" else None
        if found is None or self.rollbacks >= 3:
            newest = ckpt.latest_state(self.ckpt_dir)
            self.record.close()
            raise NonFiniteLoss(
                f"{err}; the run stopped. Nothing non-finite was written: the newest checkpoint is "
                f"{newest or 'none (no step was saved yet)'}. Lower optim.lr or set optim.clip_grad"
                + (", or set train.on_nonfinite=rollback" if self.cfg.on_nonfinite == "stop" else "")
                + ", then run the same command again to resume") from None
        path, saved = found
        self.state.load_state_dict(saved, str(path), keep_position=True)
        self.rollbacks, self.bad_run, self.running, self.count = self.rollbacks + 1, 0, {}, 0
        self.record.rewind(self.state.step)
        log.warning(f"{err}; rolled back to {path.name} (step {self.state.step}), skipping the data since then "
                    f"(rollback {self.rollbacks} of 3)")

    def finish(self) -> dict:
        self.record.close()
        if self.rt.is_main:  # the run is done only now that every end-of-run output exists
            done = {"step": self.state.step, "task": self.config.run.task}
            ckpt.atomic_write(self.run_dir / "done.json", lambda tmp: tmp.write_text(json.dumps(done) + "\n"))
        return {"step": self.state.step, "history": self.history, "model": self.state.model, "ema": self.state.ema}


def apply_gradients(state: TrainState, clip: float | None, ema_decay: float | None) -> bool:
    """Unscale, clip, and step the optimiser and the EMA only when every gradient is finite (a skipped step
    changes no weight, as a grad scaler's). Returns whether the step was taken."""
    state.scaler.unscale_(state.optimizer)
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    finite = bool(torch.isfinite(norm))  # the one host sync per step
    if finite:
        state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if finite and state.ema is not None:
        update_ema(state.ema, state.model, ema_decay)
    return finite


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(config: Config, task: Task, runtime: Runtime | None = None, resume: str | None = "auto") -> dict:
    """Train `task` under `config`. resume: 'auto' (newest checkpoint of the run folder that verifies, if any),
    None (start fresh; refuses to overwrite an existing run), or a path to a state file."""
    rt = runtime or setup_runtime(config.run.device)
    cfg, run_dir = config.train, config.run_dir
    with RunLock(run_dir) if rt.is_main else contextlib.nullcontext():  # one run per folder
        plan = BatchPlan.of(cfg, config.optim.warmup_epochs, len(task.train_set), rt, config.min_steps)
        state = build_state(config, task, rt, plan)
        if rt.is_main:  # before the first step, so a run that will not fit says so in its first lines
            log.info(estimate_run(config, task, plan.micro_batch, rt.device,
                                  autocast_dtype(cfg.amp, rt.device)).line() + f" at micro-batch {plan.micro_batch}")
        restore(state, run_dir / "checkpoints", resume, rt)
        if rt.is_main:
            save_config(config, run_dir / "config.yaml")
            ckpt.remove_stale_temps(run_dir / "checkpoints")  # of a writer killed mid-write
        loop = Loop(config, task, rt, plan, state)
        if loop.eval_due(state.step) and state.step not in loop.record.evaluated_steps:
            loop.evaluate(state.step)  # a killed run checkpointed this step but did not finish its evaluation
        state.model.train()
        while state.step < plan.total_steps:
            try:
                loop.train_step()
                step = state.step
                if loop.due(cfg.log_every, step) or loop.due(cfg.ckpt_every, step):
                    loop.log_means()
                if loop.due(cfg.ckpt_every, step):
                    loop.checkpoint()
                if loop.eval_due(step):
                    loop.evaluate(step)
            except _Diverged as err:
                loop.recover(err)
        return loop.finish()

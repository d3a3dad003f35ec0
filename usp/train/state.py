"""Everything a resume needs, in one object: model, EMA, optimiser, grad scaler, data position, RNG, step.

`TrainState.state_dict()` is what `state_*.pt` holds; `load_state_dict` restores it exactly, so that
"N steps straight" equals "k steps, kill, resume, N−k steps" bit for bit on CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from usp.data.sampler import DataStream
from usp.run.weights import load_strict


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema ← decay·ema + (1−decay)·θ


def all_finite(module: nn.Module | None) -> bool:
    if module is None:
        return True
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stream: DataStream
    ema: nn.Module | None = None
    step: int = 0
    skipped: int = 0  # optimiser steps skipped for non-finite gradients, over the whole run

    @classmethod
    def create(cls, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               stream: DataStream, ema_decay: float | None) -> TrainState:
        ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
        return cls(model, optimizer, scaler, stream, ema)

    def finite(self) -> bool:
        """Are the weights, buffers and EMA all finite (checked before anything is written)?"""
        return all_finite(self.model) and all_finite(self.ema)

    def state_dict(self) -> dict:
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "data": self.stream.state_dict(), "skipped": self.skipped}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if next(self.model.parameters()).is_cuda:
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict, source: str, keep_position: bool = False) -> None:
        """Restore `state`. keep_position: leave the data stream where it is (a rollback skips the data that
        diverged)."""
        load_strict(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"checkpoint {source} holds no EMA but train.ema_decay is set; resume with the "
                                 "recipe that wrote it")
            load_strict(self.ema, state["ema"], source)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and next(self.model.parameters()).is_cuda:
            torch.cuda.set_rng_state(state["rng_cuda"])
        self.step, self.skipped = int(state["step"]), int(state.get("skipped", 0))
        if not keep_position:
            self.stream.load_state_dict(state["data"])

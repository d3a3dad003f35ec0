"""The peak memory of a training run per device, estimated before its first step.

peak ≈ weights + gradients + optimiser state + EMA + frozen modules (VAE, REPA teacher) + activations, where
the activations are what autograd saves for the backward pass of one micro-batch. They are measured, not
guessed: the task's own loss runs once on *fake* tensors (torch's FakeTensorMode: shapes, dtypes and devices,
no data, no compute) with a hook that adds up every tensor saved for backward, deduplicated by storage.
So the figure follows the real model, the real autocast precision and the real micro-batch, at no memory
cost, and can be taken for any batch (`--predict` of the rehearsal: the recipe's own per-GPU batch).

What it leaves out: the transient of the largest backward op, the frozen VAE's encode activations (bounded by
latent.vae_batch, and freed before the backward), allocator fragmentation and the CUDA context (~0.5 GB).
tests/test_memory.py checks the estimate against a measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

GiB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per device, by what holds them."""

    parts: dict[str, int] = field(default_factory=dict)
    missing: str = ""  # what the estimate could not include

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        shown = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return (f"estimated peak memory per device {self.total / GiB:.2f} GiB ({shown})"
                + (f"; {self.missing}" if self.missing else ""))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def optimizer_slots(name: str) -> int:
    """fp32 state tensors per trainable weight: AdamW 2 (exp_avg, exp_avg_sq), LARS/SGD 1 (momentum)."""
    return 2 if name == "adamw" else 1


class _FakeCall(nn.Module):
    """Calls `model` with fake weights (torch.func.functional_call), so the real weights and buffers (a probe
    head's BatchNorm statistics) are never touched; attribute reads fall through to the real model."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self._model, self._state, args, kwargs)

    def __getattr__(self, name: str):
        if name == "module":
            return self._model
        return getattr(self._model, name)


def _traceable_copy(task):
    """A copy of `task` that shares its modules and datasets (no memory) but not its small helper objects, whose
    per-device caches (a diffusion's schedule tables) would otherwise keep the fake tensors of the trace."""
    import copy

    from torch.utils.data import Dataset

    shared: dict[int, object] = {}
    for value in vars(task).values():
        for obj in (value, *(vars(value).values() if hasattr(value, "__dict__") else ())):
            if isinstance(obj, (nn.Module, Dataset, torch.Tensor)):
                shared[id(obj)] = obj
    return copy.deepcopy(task, memo=shared)


def activation_bytes(task, batch: dict, device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """Bytes autograd saves for backward when `task.loss` runs on `batch` (a collated micro-batch: any size,
    since its tensors are made fake here), with the model's weights excluded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    task = _traceable_copy(task)
    model = task.model
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    real = {id(p) for p in model.parameters()}
    named = [*model.named_parameters(), *model.named_buffers()]
    # Integer buffers (BatchNorm's batch count, read as a Python number) stay real: copies, never the model's.
    state = {k: v.clone() for k, v in named if not v.is_floating_point()}
    with mode:
        state.update({k: mode.from_tensor(v) for k, v in named if v.is_floating_point()})
        for k, p in model.named_parameters():
            state[k].requires_grad_(p.requires_grad)
    weights = {_storage_key(t) for t in state.values()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in real and not isinstance(t, nn.Parameter):
            key = _storage_key(t)
            if key not in weights:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with mode:  # contiguous: a batch expanded from one item becomes full-size fake storage, as a real batch is
        fake_batch = {k: mode.from_tensor(v).contiguous() if torch.is_tensor(v) else v for k, v in batch.items()}
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        type(task).loss(task, _FakeCall(model, state), fake_batch)  # the class's loss: not a test's wrapper of it
    return sum(seen.values())


def repeat_batch(item_batch: dict, size: int) -> dict:
    """A collated batch of one item repeated to `size` items (views: no memory)."""
    return {k: v.expand(size, *v.shape[1:]) if torch.is_tensor(v) and v.ndim else v for k, v in item_batch.items()}


def estimate_peak(task, optimizer_name: str, ema: bool, micro_batch: int, device: torch.device,
                  amp_dtype: torch.dtype | None, item_batch: dict | None) -> MemoryEstimate:
    """The per-device peak of a run of `task`: its model, optimiser, EMA, frozen modules and the activations
    of `micro_batch` items (traced from `item_batch`, one collated item; None: activations not estimated)."""
    model = task.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [m for m in (getattr(getattr(task, "data", None), "vae", None), getattr(task, "teacher", None))
              if isinstance(m, nn.Module)]
    parts = {
        "weights": _bytes(params) + _bytes(model.buffers()),
        "gradients": _bytes(trainable),
        "optimizer": optimizer_slots(optimizer_name) * sum(p.numel() * 4 for p in trainable),
        "ema": _bytes(params) if ema else 0,
        "frozen": sum(_bytes(m.parameters()) + _bytes(m.buffers()) for m in frozen),
    }
    estimate = MemoryEstimate(parts)
    if item_batch is not None:
        try:
            parts["activations"] = activation_bytes(task, repeat_batch(item_batch, micro_batch), device, amp_dtype)
        except Exception as err:  # noqa: BLE001 - a loss fake tensors cannot run: the estimate says so
            estimate.missing = f"activations not traced ({type(err).__name__}: {str(err)[:120]})"
    return estimate


def estimate_run(config, task, micro_batch: int, device: torch.device,
                 amp_dtype: torch.dtype | None) -> MemoryEstimate:
    """`estimate_peak` for a recipe's run: its optimiser and EMA, one item of its data (with the task's
    per-sample randomness) traced at `micro_batch`."""
    from torch.utils.data import default_collate

    from usp.data.sampler import SeededDataset

    extras = getattr(task, "extras", None)
    item = default_collate([SeededDataset(task.train_set, extras)[(0, config.run.seed)]])
    item = {k: v.to(device) if torch.is_tensor(v) else v for k, v in item.items()}
    return estimate_peak(task, config.optim.name, bool(config.train.ema_decay), micro_batch, device, amp_dtype,
                         item)

"""The process set-up of a run: torchrun's process group, the device, backend flags, AMP dtype, and the
mean of a few numbers over ranks. The one place that touches process-wide state."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


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
        raise ValueError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
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


# The autocast dtype of each precision a recipe names (train.amp, generation.amp, latent.vae_precision); None = full
# precision, no autocast. The one table: training, sampling and the VAE read it.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16, Linux /proc/cpuinfo flags).
    Without it, CPU autocast emulates bf16 and runs slower than fp32; elsewhere (macOS, Windows) we say no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Where `auto` lands on a CPU can be pinned for a whole process tree: USP_CPU_AMP=fp32 (or bf16). The test suite
# sets fp32 (tests/conftest.py) so that its fp32-tolerance comparisons do not depend on whether the machine running
# it has native bf16; a user may set it to get one precision everywhere without editing recipes.
CPU_AMP_ENV = "USP_CPU_AMP"


def pinned_cpu_amp() -> str | None:
    """USP_CPU_AMP's value (fp32 / bf16) or None when unset; anything else is refused with the fix."""
    value = os.environ.get(CPU_AMP_ENV, "").strip().lower()
    if value and value not in ("fp32", "bf16"):
        raise ValueError(f"{CPU_AMP_ENV}={value!r}: use fp32 or bf16, or unset it to let train.amp=auto decide")
    return value or None


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. auto: bf16 on GPU, and on a CPU with native bf16 (a forward + backward of the demo's
    tiny ViT at batch 256 takes ~0.7x the fp32 time there, DiT-B/2 ~0.35x); fp32 on other CPUs, where emulated
    bf16 is slower than fp32. USP_CPU_AMP pins what `auto` means on a CPU."""
    if amp == "auto":
        if device.type == "cpu" and (pinned := pinned_cpu_amp()):
            return AUTOCAST_DTYPES[pinned]
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    return AUTOCAST_DTYPES[amp]


def describe_precision(amp: str, device: torch.device) -> str:
    """One log phrase: the precision a run trains in and, for `auto`, why."""
    dtype = autocast_dtype(amp, device)
    name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "fp32")
    if amp != "auto":
        return f"{name} (train.amp={amp})"
    if device.type == "cpu":
        if pinned_cpu_amp():
            why = f"{CPU_AMP_ENV}={pinned_cpu_amp()} in the environment"
        else:
            why = "the CPU has native bf16 (avx512_bf16/amx_bf16)" if dtype else "the CPU has no native bf16"
        return f"{name} (train.amp=auto: {why}; train.amp=fp32 to force full precision)"
    return f"{name} (train.amp=auto)"


def wrap_model(model: nn.Module, rt: Runtime, compile: bool) -> nn.Module:
    """The module the loss runs through: DDP across ranks, then torch.compile if asked."""
    if rt.world_size > 1:
        # Gradients live in the all-reduce buckets (no second copy of every gradient, one memcpy less a step).
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                    else None, gradient_as_bucket_view=True)
    return torch.compile(model) if compile else model


def mean_over_ranks(values: dict[str, torch.Tensor], rt: Runtime) -> dict[str, float]:
    """Average scalar tensors over ranks (one all-reduce) and bring them to the host."""
    if rt.world_size > 1 and values:
        stacked = torch.stack(list(values.values()))
        dist.all_reduce(stacked)
        values = dict(zip(values, stacked / rt.world_size))
    return {k: float(v) for k, v in values.items()}


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()

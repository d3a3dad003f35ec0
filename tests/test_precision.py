"""`train.amp: auto` picks bf16 on a CPU with native bf16 and fp32 elsewhere; explicit choices are kept; USP_CPU_AMP
pins what auto means on a CPU (the suite sets fp32 in conftest.py). The CPU's flags are patched, so both branches
run on any machine."""

import logging

import pytest
import torch

from usp.run import runtime as dist

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_the_suite_runs_auto_in_fp32_on_any_cpu():
    """conftest.py pins auto to fp32 (the environment reaches every CLI subprocess too), so the suite's fp32
    tolerances hold on a native-bf16 CPU as on any other."""
    assert dist.autocast_dtype("auto", CPU) is None
    assert dist.describe_precision("auto", CPU).startswith("fp32 (train.amp=auto: USP_CPU_AMP=fp32 in the environment")


@pytest.fixture(autouse=True)
def unpinned(request, monkeypatch):
    """Every other test here sees auto as a user without USP_CPU_AMP does."""
    if request.function.__name__ != "test_the_suite_runs_auto_in_fp32_on_any_cpu":
        monkeypatch.delenv(dist.CPU_AMP_ENV, raising=False)


def fake_cpuinfo(monkeypatch, tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: fake\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k))


@pytest.mark.parametrize("flags, native", [("avx512f avx512_bf16", True), ("avx512f amx_tile amx_bf16", True),
                                           ("avx2 avx512f avx512bw", False), ("avx512_bf16x", False), ("", False)])
def test_native_bf16_read_from_cpu_flags(monkeypatch, tmp_path, flags, native):
    fake_cpuinfo(monkeypatch, tmp_path, flags)
    assert dist.cpu_has_native_bf16() is native
    assert dist.autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert ("native bf16 (" in dist.describe_precision("auto", CPU)) is native


def test_no_cpuinfo_means_fp32(monkeypatch):
    def refuse(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")
    monkeypatch.setattr("builtins.open", refuse)
    assert dist.cpu_has_native_bf16() is False and dist.autocast_dtype("auto", CPU) is None


@pytest.mark.parametrize("native", [True, False])
def test_explicit_choices_ignore_the_cpu(monkeypatch, native):
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: native)
    assert dist.autocast_dtype("fp32", CPU) is None and dist.autocast_dtype("bf16", CPU) == torch.bfloat16
    assert dist.autocast_dtype("fp16", CPU) == torch.float16
    assert dist.autocast_dtype("auto", CUDA) == torch.bfloat16  # GPUs: bf16 whatever the CPU
    assert dist.describe_precision("fp32", CPU) == "fp32 (train.amp=fp32)"


@pytest.mark.parametrize("native", [True, False])
def test_environment_pins_auto_on_cpu_only(monkeypatch, native):
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setenv(dist.CPU_AMP_ENV, "fp32")
    assert dist.autocast_dtype("auto", CPU) is None
    assert "USP_CPU_AMP=fp32" in dist.describe_precision("auto", CPU)
    assert dist.autocast_dtype("bf16", CPU) == torch.bfloat16  # an explicit recipe choice wins over the pin
    assert dist.autocast_dtype("auto", CUDA) == torch.bfloat16  # GPUs are not pinned
    monkeypatch.setenv(dist.CPU_AMP_ENV, " BF16 ")
    assert dist.autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setenv(dist.CPU_AMP_ENV, "fp16")
    with pytest.raises(ValueError, match="USP_CPU_AMP='fp16': use fp32 or bf16"):
        dist.autocast_dtype("auto", CPU)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_training_step_runs_in_the_chosen_precision(monkeypatch, tmp_path, caplog, native, dtype):
    """The engine's autocast follows the choice: the model's matmul output dtype inside the step says which ran,
    and the run's first log line names it."""
    from usp.config import load_config, recipes_dir
    from usp.train.engine import train
    from usp.train.tasks import build_task

    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: native)
    config = load_config(recipes_dir() / "fmnist" / "vae.yaml",
                         [f"run.out_dir={tmp_path}", "train.max_steps=1", "train.progress=false", "data.limit=64",
                          "train.tensorboard=false", "train.global_batch=8", "vae.init_images=64",
                          f"vae.out={tmp_path / 'vae'}"])
    task = build_task(config)
    seen = []
    loss = task.loss
    def spy(model, batch):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return loss(model, batch)
        finally:
            handle.remove()
    task.loss = spy
    with caplog.at_level(logging.INFO):
        train(config, task, resume=None)
    assert seen and seen[0] == dtype
    expected = ("bf16 autocast (train.amp=auto: the CPU has native bf16" if native
                else "fp32 (train.amp=auto: the CPU has no")
    assert expected in caplog.text

"""Runs that lose nothing (issue 13): one test per fault, each asserting that nothing was lost (the previous
checkpoint loads, the user's files are all there) and that the message names the problem; then SIGKILLs at
random points of real CLI runs, whose finals must equal uninterrupted runs bit for bit."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usp import CheckpointError, DiskFullError, RunLocked
from usp.cli import main as cli_main
from usp.config import load_config
from usp.run import checkpoint as ckpt
from usp.run.weights import load_weights
from usp.train.engine import NonFiniteLoss, Runtime, train
from usp.train.tasks import build_task

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"))


def run(overrides, resume="auto", task=None):
    config = load_config(None, overrides)
    return config, train(config, task or build_task(config), CPU, resume=resume)


def states(config) -> dict[int, Path]:
    return {int(p.name[6:13]): p for p in (config.run_dir / "checkpoints").glob("state_*.pt")}


def logged_steps(config) -> list[int]:
    rows = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval" not in r]


def empty_recipe(folder: Path) -> str:
    """The CLI takes a recipe before its overrides: an empty one means the defaults."""
    (folder / "empty.yaml").write_text("{}\n")
    return str(folder / "empty.yaml")


def poison(task, calls: set[int]):
    """Make the loss of the given micro-batch calls (1-based) NaN."""
    original, n = task.loss, {"n": 0}

    def loss(model, batch):
        n["n"] += 1
        out = original(model, batch)
        return {"loss": out["loss"] * float("nan")} if n["n"] in calls else out

    task.loss = loss
    return task


# --------------------------------------------------------------------------------------------
# 1. The non-finite guard protects the saved state
# --------------------------------------------------------------------------------------------


def test_1_overflowing_update_saves_nothing_non_finite_and_keeps_the_finite_checkpoint(fmnist_overrides):
    config, _ = run([*fmnist_overrides, "train.max_steps=2"])  # a healthy checkpoint at step 2
    good = ckpt.digest(ckpt.load_state(states(config)[2]))
    # The reproduction: lr 1e39 overflows the weights in one Adam step; keep_last=1, a checkpoint each step.
    blown = [*fmnist_overrides, "optim.lr=1e39", "optim.warmup_epochs=0", "train.ckpt_every=1", "train.keep_last=1",
             "train.max_steps=4"]
    with pytest.raises(NonFiniteLoss, match="weights became non-finite by step 3 although every gradient was "
                                            "finite.*newest checkpoint is .*state_0000002.pt"):
        run(blown)
    assert sorted(states(config)) == [2]  # nothing written for step 3, and the finite one was not pruned
    assert ckpt.digest(ckpt.load_state(states(config)[2])) == good
    # From scratch, the message says that nothing was saved (max_steps=1 used to exit 0 with NaN weights).
    fresh = [*blown, "run.name=fresh", "train.max_steps=1"]
    with pytest.raises(NonFiniteLoss, match="by step 1 .*newest checkpoint is none"):
        run(fresh)
    assert not states(load_config(None, fresh))


def test_1_a_non_finite_step_is_skipped_changes_nothing_and_rollback_recovers(fmnist_overrides, caplog):
    config, result = run([*fmnist_overrides, "train.max_steps=3", "train.ckpt_every=1"],
                         task=poison(build_task(load_config(None, fmnist_overrides)), {3}))
    s2, s3 = (ckpt.load_state(states(config)[k]) for k in (2, 3))
    assert s3["skipped"] == 1 and s2["skipped"] == 0
    assert ckpt.digest(s3["model"]) == ckpt.digest(s2["model"])  # the skipped step moved no weight
    assert ckpt.digest(s3["optimizer"]["state"]) == ckpt.digest(s2["optimizer"]["state"])  # nor Adam's moments
    rows = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    assert rows[2] == {**rows[2], "step": 3, "skipped_steps": 1} and "loss" not in rows[2]
    # Rollback: steps 5 and 6 diverge (2 in a row = max_skipped_steps) -> back to step 4, data of 5-6 skipped.
    over = [*fmnist_overrides, "run.name=rollback", "train.max_steps=8", "train.max_skipped_steps=2",
            "train.on_nonfinite=rollback"]
    config, result = run(over, task=poison(build_task(load_config(None, over)), {5, 6}))
    assert "rolled back to state_0000004.pt (step 4)" in caplog.text
    assert result["step"] == 8 and logged_steps(config) == list(range(1, 9))  # no step logged twice
    final = ckpt.load_state(states(config)[8])
    assert final["data"] == {"epoch": 2, "offset": 32}  # 10 steps of data consumed (64 items = 4 steps/epoch)
    assert all(torch.isfinite(v).all() for v in final["model"].values())


# --------------------------------------------------------------------------------------------
# 2. A corrupt latest checkpoint: fall back, move it aside, say so
# --------------------------------------------------------------------------------------------


def test_2_corrupt_latest_checkpoint_falls_back_and_is_moved_aside(fmnist_overrides, caplog):
    config, _ = run(fmnist_overrides)  # checkpoints at 2 and 4
    folder = config.run_dir / "checkpoints"
    straight = ckpt.digest(ckpt.load_state(folder / "state_0000004.pt"))
    state2 = (folder / "state_0000002.pt").read_bytes()
    # Every kind of bad file is named, never a bare EOFError or a PyTorch traceback.
    for name, data, message in [("empty.pt", b"", "is empty"), ("garbage.pt", os.urandom(5000), "cannot be read"),
                                ("cut.pt", state2[: len(state2) // 2], "cannot be read")]:
        (folder.parent / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            ckpt.load_state(folder.parent / name)
    flipped = bytearray(state2)
    flipped[-len(state2) // 3] ^= 0xFF  # one byte inside a tensor: torch.load succeeds, the digest does not
    (folder.parent / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="do not match the digest"):
        ckpt.load_state(folder.parent / "flipped.pt")
    cut = (folder / "state_0000004.pt").read_bytes()[:1000]
    (folder / "state_0000004.pt").write_bytes(cut)
    config, _ = run(fmnist_overrides)
    assert "moved it aside to state_0000004.pt.corrupt" in caplog.text
    assert "resuming from state_0000002.pt" in caplog.text
    assert (folder / "state_0000004.pt.corrupt").read_bytes() == cut  # kept, never deleted
    assert ckpt.digest(ckpt.load_state(folder / "state_0000004.pt")) == straight  # redone bit for bit
    assert logged_steps(config) == [1, 2, 3, 4]
    # Nothing loads at all: one clear error, and the files are kept aside.
    for path in folder.glob("state_*.pt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads"):
        run(fmnist_overrides)
    assert len(list(folder.glob("state_*.corrupt*"))) == 3


# --------------------------------------------------------------------------------------------
# 3. End-of-run outputs complete on restart
# --------------------------------------------------------------------------------------------


def test_3_vae_folder_is_written_on_restart_after_a_kill_past_the_final_checkpoint(tmp_path):
    over = ["run.task=vae", "data.source=fashion_mnist", "data.image_size=32", "data.limit=32", "data.hflip=false",
            "data.num_workers=0", "vae.width=16", "vae.init_images=16", f"run.out_dir={tmp_path}", "run.name=vae",
            "train.global_batch=16", "train.max_steps=2", "train.ckpt_every=2", "train.tensorboard=false",
            "train.progress=false", "optim.lr=1e-3", "optim.warmup_epochs=0"]
    config = load_config(None, over)
    task = build_task(config)
    task.evaluate = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # killed after state_0000002.pt
    with pytest.raises(KeyboardInterrupt):
        train(config, task, CPU)
    assert ckpt.latest_state(config.run_dir / "checkpoints").name == "state_0000002.pt"
    assert not (config.run_dir / "vae").exists() and not (config.run_dir / "done.json").exists()
    run(over)
    assert {p.name for p in (config.run_dir / "vae").iterdir()} >= {"config.json", "latent_stats.json"}
    assert json.loads((config.run_dir / "done.json").read_text())["step"] == 2
    rows = [json.loads(line) for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [2] and "psnr_test" in rows[-1]["eval"]


# --------------------------------------------------------------------------------------------
# 4. One run per folder
# --------------------------------------------------------------------------------------------


def test_4_a_second_run_on_a_busy_folder_fails_at_once_naming_the_holder(fmnist_overrides, tmp_path):
    config, _ = run([*fmnist_overrides, "train.max_steps=2"])
    before = ckpt.digest(ckpt.load_state(states(config)[2]))
    recipe = empty_recipe(tmp_path)
    with ckpt.RunLock(config.run_dir):
        with pytest.raises(RunLocked, match=f"in use by process {os.getpid()}"):
            ckpt.RunLock(config.run_dir).__enter__()
        # The real CLI in another process: one error line, exit 2, before any step.
        proc = subprocess.run([sys.executable, "-m", "usp", "pretrain", recipe, *fmnist_overrides,
                               "train.max_steps=4"],
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by process {os.getpid()}" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(states(config)) == [2] and ckpt.digest(ckpt.load_state(states(config)[2])) == before
    with ckpt.RunLock(config.run_dir):  # released when its holder exits
        pass
    # Temporary names are unique per writer, so two writers never rename each other's half-written file.
    names = set()
    for _ in range(2):
        ckpt.atomic_write(config.run_dir / "x.bin", lambda tmp: (names.add(tmp.name), tmp.write_bytes(b"1")))
    assert len(names) == 2


# --------------------------------------------------------------------------------------------
# 5. Disk full
# --------------------------------------------------------------------------------------------


def test_5_disk_full_during_a_checkpoint_write_keeps_the_previous_one(fmnist_overrides, monkeypatch):
    config, _ = run([*fmnist_overrides, "train.max_steps=2"])
    before = ckpt.digest(ckpt.load_state(states(config)[2]))
    real_save = torch.save

    usage, full = ckpt.shutil.disk_usage, {"now": False}

    def full_disk(obj, path):  # the disk fills half-way through the state, as torch's zip writer reports it
        real_save(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:4096])
        full["now"] = True
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(p)._replace(free=4096) if full["now"] else usage(p))
    with pytest.raises(DiskFullError, match=r"no space left on the disk of .*checkpoints to write "
                                            r"state_0000004.pt: it needs about [0-9.]+ MiB, 0.0 MiB are free"):
        run([*fmnist_overrides, "train.max_steps=4"])
    assert not list((config.run_dir / "checkpoints").glob("*.tmp"))  # no 9 MB leftovers
    assert sorted(states(config)) == [2] and ckpt.digest(ckpt.load_state(states(config)[2])) == before


def test_5_disk_full_for_the_latent_cache_is_an_error_up_front(tiny_vae_dir, tmp_path, monkeypatch):
    from usp.data.images import FashionMNISTDataset, build_transform
    from usp.latent.cache import build_cache, read_header
    from usp.latent.vae import LatentSpace

    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=8)
    build_cache(torch.utils.data.Subset(dataset, range(4)), latent, 32, tmp_path / "a", "train", progress=False)

    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError, match=r"no space left .* latent cache train.latents: it needs [0-9.]+ MiB"):
        build_cache(dataset, latent, 32, tmp_path / "b", "train", progress=False)
    assert not (tmp_path / "b" / "train.latents").exists()  # no half-allocated file left behind
    # A partial cache being resumed keeps its state: the header still says 4 of 4 done... of its own count.
    before = (tmp_path / "a" / "train.latents").read_bytes()
    header = read_header(tmp_path / "a" / "train.latents")
    header["done"] = 2
    from usp.latent.cache import _write_header

    _write_header(tmp_path / "a" / "train.latents", header)
    before = (tmp_path / "a" / "train.latents").read_bytes()
    with pytest.raises(DiskFullError):
        build_cache(torch.utils.data.Subset(dataset, range(4)), latent, 32, tmp_path / "a", "train", progress=False)
    assert (tmp_path / "a" / "train.latents").read_bytes() == before


# --------------------------------------------------------------------------------------------
# 6. A latent cache is tied to its VAE and data
# --------------------------------------------------------------------------------------------


def test_6_a_cache_made_with_another_vae_or_data_is_refused(tiny_vae_dir, tmp_path, fmnist_overrides):
    from conftest import TINY_VAE_CONFIG
    from diffusers import AutoencoderKL

    from usp.data.images import FashionMNISTDataset, build_transform
    from usp.latent.cache import build_cache, cache_source, vae_fingerprint
    from usp.latent.vae import LatentSpace

    cached = [*fmnist_overrides, f"latent.cache={tmp_path / 'cache'}", "data.limit=16"]
    config = load_config(None, cached)
    latent = LatentSpace.load("small-f4", str(tiny_vae_dir))
    dataset = FashionMNISTDataset(split="train", transform=build_transform(32, "center", hflip=False), limit=16)
    path = build_cache(dataset, latent, 32, tmp_path / "cache", "train", progress=False,
                       source=cache_source(config, "train"))
    before = path.read_bytes()
    build_task(config)  # the matching recipe is accepted
    torch.manual_seed(1)  # another VAE of the same space, channels and size
    other = tmp_path / "other-vae"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(str(other))
    (other / "latent_stats.json").write_text((tiny_vae_dir / "latent_stats.json").read_text())
    theirs, ours = vae_fingerprint(latent), vae_fingerprint(LatentSpace.load("small-f4", str(other)))
    with pytest.raises(ValueError, match=f"not made from this recipe \\(the VAE weights differ\\): vae_sha256 "
                                         f"'{theirs}' \\(cache\\) vs '{ours}' \\(recipe\\)"):
        build_task(load_config(None, [*cached, f"latent.path={other}"]))
    with pytest.raises(ValueError, match="16 images \\(cache\\) vs 32 \\(recipe data.limit\\)"):
        build_task(load_config(None, [*cached, "data.limit=32"]))
    assert path.read_bytes() == before  # refusing touches nothing


# --------------------------------------------------------------------------------------------
# 7. Exact resume with gradient accumulation
# --------------------------------------------------------------------------------------------


def test_7_accumulation_resume_is_bitwise_when_a_step_straddles_epochs(fmnist_overrides, interrupt_loss):
    # N = 100, global batch 40, accum 2: micro-batches of 20, 5 per epoch; step 3 takes the last of epoch 0 and
    # the first of epoch 1. Resuming from the step-2 checkpoint must continue exactly there.
    accum = [*fmnist_overrides, "data.limit=100", "train.global_batch=40", "train.accum_steps=2",
             "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2"]
    straight, _ = run([*accum, "run.name=straight"])
    split = load_config(None, [*accum, "run.name=split"])
    task = build_task(split)
    interrupt_loss(task, 5)  # the 5th micro-batch: inside step 3 (2 micro-batches per step)
    with pytest.raises(KeyboardInterrupt):
        train(split, task, CPU)
    assert ckpt.load_state(states(split)[2])["data"] == {"epoch": 0, "offset": 80}
    run([*accum, "run.name=split"])
    a, b = ckpt.load_state(states(straight)[4]), ckpt.load_state(states(split)[4])
    for key in ("model", "optimizer", "data", "rng_cpu"):
        assert ckpt.digest(a[key]) == ckpt.digest(b[key]), key
    assert logged_steps(split) == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# 8. Input checked before step 1
# --------------------------------------------------------------------------------------------


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.randint(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)


def test_8_inputs_are_checked_before_step_1(tmp_path, fmnist_overrides, caplog):
    for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
        _png(tmp_path / "data" / "train" / name)
    vae = ["run.task=vae", "data.source=folder", f"data.root={tmp_path / 'data'}", "data.image_size=32",
           "data.num_workers=0", "vae.width=16", "vae.init_images=4", f"run.out_dir={tmp_path / 'runs'}",
           "train.global_batch=2", "train.max_steps=2", "train.progress=false", "train.tensorboard=false"]
    with pytest.raises(FileNotFoundError, match="data/val does not exist"):  # eval_split, read only at the end
        build_task(load_config(None, vae))
    (tmp_path / "data" / "val" / "c").mkdir(parents=True)
    _png(tmp_path / "data" / "val" / "a" / "1.png")
    with caplog.at_level("WARNING"):  # an empty class stays a label (splits agree on labels), named once
        build_task(load_config(None, vae))
    assert "1 class folder(s) hold no images: c" in caplog.text
    with pytest.raises(FileNotFoundError, match="data.root=/nonexistent holds no Fashion-MNIST"):
        build_task(load_config(None, [*fmnist_overrides, "data.root=/nonexistent"]))
    dit = [*fmnist_overrides, "run.task=finetune", "model.name=dit_t_2", "model.num_classes=5"]
    with pytest.raises(ValueError, match="model.num_classes=5 but the data has 10 classes; set model.num_classes=10"):
        build_task(load_config(None, dit))
    with pytest.raises(ValueError, match="train.max_steps must be at least 1"):
        load_config(None, ["train.max_steps=0"])
    assert not (tmp_path / "runs").exists()  # nothing started


# --------------------------------------------------------------------------------------------
# 9. One error style
# --------------------------------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def test_9_user_errors_are_one_line_with_exit_2(fmnist_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("USP_DEBUG", raising=False)
    recipe = empty_recipe(tmp_path)
    config, _ = run([*fmnist_overrides, "train.max_steps=2"])
    folder = config.run_dir / "checkpoints"
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    message = _cli_error(capsys, ["reconstruct", str(tmp_path / "bad.safetensors")])
    assert "bad.safetensors cannot be read" in message and "use another weights" in message
    message = _cli_error(capsys, ["pretrain", recipe, *fmnist_overrides, "optim.lr=1e39", "optim.warmup_epochs=0",
                                  "train.max_steps=3", "train.ckpt_every=1"])
    assert "weights became non-finite by step 3" in message and "state_0000002.pt" in message
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Image.new("RGB", (1, 1))}, evil)  # an object weights_only refuses
    message = _cli_error(capsys, ["finetune", recipe, *fmnist_overrides, "model.name=dit_t_2", "model.num_classes=10",
                                  f"model.init={evil}", "run.name=ft"])
    assert "evil.pt" in message and "weights_only=False" not in message
    (folder / "state_0000002.pt").write_bytes(b"")
    message = _cli_error(capsys, ["pretrain", recipe, *fmnist_overrides, "train.max_steps=3"])
    assert "no checkpoint in" in message and "state_0000002.pt.corrupt" in message
    monkeypatch.setenv("USP_DEBUG", "1")  # the traceback on request
    with pytest.raises(ValueError, match="train.max_steps must be at least 1"):
        cli_main(["pretrain", recipe, *fmnist_overrides, "train.max_steps=0"])
    # An offline hub id: a separate process, so the hub reads HF_HUB_OFFLINE when it is imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "USP_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-m", "usp", "cache-latents", recipe,
                           "data.source=fashion_mnist", "data.image_size=64", "data.limit=4", "run.device=cpu",
                           "latent.space=sd-vae-ft-ema", "latent.path=some-org/no-such-vae",
                           "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "set latent.path to a local diffusers folder of this VAE" in proc.stderr


# --------------------------------------------------------------------------------------------
# SIGKILLs at random points of real CLI runs
# --------------------------------------------------------------------------------------------

# Runs the real CLI with one optional hook that makes a SIGKILL land at a chosen moment: `mid_write` sleeps in
# the second state write of the process with the temporary file half written; `after_final` sleeps right after
# the final state is on disk (before the end-of-run outputs). The hook writes a marker file when it is there.
DRIVER = """
import os, sys, time
from pathlib import Path
import usp.run.checkpoint as c
fault, marker = os.environ.get("FAULT", ""), os.environ.get("FAULT_MARKER", "")
writes, final = {"n": 0}, int(os.environ.get("FAULT_FINAL", "0"))
real_write, real_save = c.atomic_write, c.save_state
def hold():
    Path(marker).write_text("here")
    time.sleep(600)
def atomic_write(path, write, needed=0):
    def half(tmp):
        write(tmp)
        if fault == "mid_write" and path.name.startswith("state_"):
            writes["n"] += 1
            if writes["n"] == 2:
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                hold()
    real_write(path, half, needed)
def save_state(folder, step, state):
    out = real_save(folder, step, state)
    if fault == "after_final" and step == final:
        hold()
    return out
c.atomic_write, c.save_state = atomic_write, save_state
from usp.cli import main
main(sys.argv[1:])
"""


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """SIGKILL `proc` once `ready()` holds; False if it exited first."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise TimeoutError("the run neither reached the kill point nor exited")


def _after_start(err_path: Path, delay: float):
    """True from `delay` seconds after the engine's start line ("N steps × B images") appeared in the log."""
    at: dict[str, float | None] = {"t": None}

    def ready() -> bool:
        if at["t"] is None and "steps ×" in err_path.read_text():
            at["t"] = time.time() + delay
        return at["t"] is not None and time.time() >= at["t"]

    return ready


def _chaos(tmp_path: Path, argv: list[str], run_dir: Path, final: int, plan: list[str], rng: random.Random):
    """Run `argv` to completion through the kills of `plan`; return (kills, restarts, restarts that resumed).
    A restart is a launch that found a checkpoint; it must say "resumed from"."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    kills, restarts, resumed = [], 0, 0
    for i, mode in enumerate([*plan, "finish"]):
        marker, err_path = tmp_path / f"{run_dir.name}_{i}.marker", tmp_path / f"{run_dir.name}_{i}.err"
        had_state = ckpt.latest_state(run_dir / "checkpoints") is not None
        env = {**os.environ, "FAULT": mode, "FAULT_MARKER": str(marker), "FAULT_FINAL": str(final)}
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, str(driver), *argv], stdout=err, stderr=err, env=env)
            if mode == "random":  # anywhere once this process trains: a step, a log row, a checkpoint, an eval
                ready = _after_start(err_path, rng.uniform(0.0, 0.4))
            else:
                ready = marker.is_file  # mid_write / after_final: the hook is there and waits
            if mode != "finish" and _kill_when(proc, ready):
                kills.append(mode)
            else:
                assert proc.wait(timeout=600) == 0, err_path.read_text()[-3000:]
        restarts += had_state
        resumed += had_state and "resumed from" in err_path.read_text()
    return kills, restarts, resumed


def _finals(run_dir: Path, final: int) -> dict:
    state = ckpt.load_state(run_dir / "checkpoints" / f"state_{final:07d}.pt")
    weights, _ = load_weights(run_dir / "checkpoints" / f"weights_{final:07d}.safetensors")
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "images_per_s", "mfu")}  # timings
            for line in (run_dir / "log.jsonl").read_text().splitlines()]
    samples = {p.name: p.read_bytes() for p in sorted((run_dir / "samples").glob("*.png"))}
    return {"model": ckpt.digest(state["model"]), "ema": ckpt.digest(state.get("ema")),
            "optimizer": ckpt.digest(state["optimizer"]), "state": ckpt.digest(state),
            "weights": ckpt.digest(weights), "log": rows, "samples": samples,
            "done": json.loads((run_dir / "done.json").read_text())}


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing(tmp_path, tiny_vae_dir):
    """≥ 10 SIGKILLs of `usp pretrain` and `usp finetune` (random moments, mid checkpoint write, right after the
    final checkpoint); every restart resumes; the finals equal uninterrupted runs bit for bit on CPU."""
    rng = random.Random(int(os.environ.get("USP_CHAOS_SEED", "13")))
    recipe = empty_recipe(tmp_path)
    common = ["data.source=fashion_mnist", "data.image_size=32", "data.limit=64", "data.num_workers=0",
              "latent.space=small-f4", f"latent.path={tiny_vae_dir}", f"run.out_dir={tmp_path / 'runs'}",
              "train.global_batch=16", "train.log_every=1", "train.ckpt_every=3", "train.tensorboard=false",
              "train.progress=false", "run.device=cpu"]
    pre = ["pretrain", recipe, *common, "model.name=vit_t_2", "train.max_steps=30", "optim.warmup_epochs=1"]
    subprocess.run([sys.executable, "-m", "usp", *pre, "run.name=pre-straight"], check=True, capture_output=True,
                   timeout=600)
    init = tmp_path / "runs" / "pre-straight" / "checkpoints" / "weights_0000030.safetensors"
    ft = ["finetune", recipe, *common, "model.name=dit_t_2", f"model.init={init}", "model.num_classes=10",
          "model.affine_norms=true", "train.max_steps=12", "train.eval_every=6", "train.ema_decay=0.9",
          "optim.lr=1e-3", "optim.weight_decay=0.0", "optim.warmup_epochs=0", "generation.sampler=ddim",
          "generation.sample_steps=ddim3", "generation.grid_per_class=1", "generation.grid_classes=4"]
    subprocess.run([sys.executable, "-m", "usp", *ft, "run.name=ft-straight"], check=True, capture_output=True,
                   timeout=600)
    total = {"kills": [], "restarts": 0, "resumed": 0, "equal": 0}
    for argv, name, final, plan in [
        (pre, "pre", 30, ["random", "mid_write", "random", "random", "random", "after_final", "random"]),
        (ft, "ft", 12, ["random", "mid_write", "random", "random", "after_final", "random"]),
    ]:
        run_dir = tmp_path / "runs" / f"{name}-killed"
        kills, restarts, resumed = _chaos(tmp_path, [*argv, f"run.name={name}-killed"], run_dir, final, plan, rng)
        total["kills"] += kills
        total["restarts"] += restarts
        total["resumed"] += resumed
        straight, killed = _finals(tmp_path / "runs" / f"{name}-straight", final), _finals(run_dir, final)
        for key in straight:
            assert straight[key] == killed[key], (name, key)
        total["equal"] += 1
        assert not list((run_dir / "checkpoints").glob("*.tmp"))
    print(f"\nSIGKILLs {len(total['kills'])} ({', '.join(total['kills'])}); restarts {total['restarts']}, "
          f"resumed {total['resumed']}; bitwise-equal finals {total['equal']}/2")
    assert len(total["kills"]) >= 10 and {"mid_write", "after_final"} <= set(total["kills"])
    assert total["resumed"] == total["restarts"]

"""Checkpoints: the full training state (resume) and a weights-only safetensors file (EMA/model); reading
a weights file is `usp.run.weights`.

Writes go to a uniquely named temporary file in the same folder, are fsynced, renamed, and the folder is
fsynced, so a crash or a power cut never leaves a half-written checkpoint under a checkpoint's name.
Each file carries a digest of its contents; resuming takes the newest state that loads and verifies,
moves a bad one aside (`*.corrupt`, never deleted) and says so. "Latest" is the highest step in the
file name, never the newest mtime. States load with `torch.load(weights_only=True)`: a checkpoint can
never run code. A run folder is held by one process at a time (`RunLock`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from usp import CheckpointError, DiskFullError, RunLocked

log = logging.getLogger("usp")

STATE_PATTERN = re.compile(r"state_(\d{7,})\.pt$")
WEIGHTS_PATTERN = re.compile(r"weights_(\d{7,})\.safetensors$")
TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------------------------
# Atomic, verified writes
# --------------------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nbytes(value: Any) -> int:
    """Bytes of all tensors in a nested state: what a checkpoint of it needs on disk, near enough."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def _disk_full(path: Path, needed: int, free: int | None = None) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free if free is None else free
    return DiskFullError(f"no space left on the disk of {path.parent} to write {path.name}: it needs about "
                         f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some space (or lower "
                         "train.keep_last) and run the same command again: it resumes from the previous checkpoint")


def atomic_write(path: Path, write: Callable[[Path], None], needed: int = 0) -> None:
    """write(tmp) into a unique temporary name beside `path`, fsync it, rename it to `path`, fsync the folder.

    On any failure the temporary file is removed and `path` (an older version, if any) is untouched.
    `needed`: the approximate size, checked against the free space first so a full disk is named as such.
    """
    free = shutil.disk_usage(path.parent).free
    if needed and free < needed:
        raise _disk_full(path, needed, free)
    # Unique per process and call: two writers (or a stale file of a killed one) never share a temp name.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        # torch.save reports a full disk as a RuntimeError from its zip writer: tell by the free space left.
        if no_space or (isinstance(err, RuntimeError) and shutil.disk_usage(path.parent).free < max(needed, 1)):
            raise _disk_full(path, needed or 1) from err
        raise
    fsync_dir(path.parent)


def digest(value: Any, h: hashlib._Hash | None = None) -> str:
    """sha256 of a nested state (dicts, lists, tensors, numbers, strings): key order, dtypes, shapes and bytes."""
    top = h is None
    h = h or hashlib.sha256()
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            digest(value[key], h)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            digest(item, h)
        h.update(b"]")
    else:
        h.update(repr(value).encode())
    return h.hexdigest() if top else ""


def save_state(folder: Path, step: int, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state_{step:07d}.pt"
    stored = {**state, "digest": digest(state)}
    atomic_write(path, lambda tmp: torch.save(stored, tmp), needed=nbytes(state) + 2**20)
    return path


def save_weights(folder: Path, step: int, weights: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"weights_{step:07d}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    meta = {"usp": json.dumps(metadata or {}), "digest": digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), needed=nbytes(tensors) + 2**20)
    return path


# --------------------------------------------------------------------------------------------
# Finding, verifying and pruning
# --------------------------------------------------------------------------------------------


def _steps(folder: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def latest_state(folder: Path) -> Path | None:
    found = _steps(folder, STATE_PATTERN)
    return found[-1][1] if found else None


def latest_weights(folder: Path) -> Path | None:
    found = _steps(folder, WEIGHTS_PATTERN)
    return found[-1][1] if found else None


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints of each kind (by step). Only ever called right after
    a verified-finite checkpoint was written, so the newest finite checkpoint is never the one deleted."""
    for pattern in (STATE_PATTERN, WEIGHTS_PATTERN):
        for _, path in _steps(folder, pattern)[:-keep_last]:
            path.unlink(missing_ok=True)


def remove_stale_temps(folder: Path) -> None:
    """Temporary files of writers that were killed mid-write (only call while holding the run lock)."""
    if folder.is_dir():
        for path in folder.glob(f"*{TMP_SUFFIX}"):
            path.unlink(missing_ok=True)


def load_state(path: Path) -> dict:
    """A state file, verified against its stored digest; a CheckpointError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state file {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or garbage files raise several types (zip, pickle, EOF, runtime)
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a usp training state (no 'step')")
    stored = state.pop("digest", None)
    if stored is not None and stored != digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the digest stored in it")
    return state


def move_aside(path: Path) -> Path:
    """Rename a bad checkpoint to `*.corrupt` (never delete a user's file: it may still be rescued)."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
    os.replace(path, target)
    return target


def load_latest_state(folder: Path) -> tuple[Path, dict] | None:
    """The newest state of `folder` that loads and verifies; bad newer ones are moved aside with a warning.

    None when the folder holds no state; a CheckpointError when it held some and none of them loads.
    """
    moved = []
    for _, path in reversed(_steps(folder, STATE_PATTERN)):
        try:
            state = load_state(path)
        except CheckpointError as err:
            moved.append(move_aside(path))
            log.warning(f"warning: {err}; moved it aside to {moved[-1].name} and falling back to an older checkpoint")
            continue
        if moved:
            log.warning(f"resuming from {path.name} instead of the unreadable {', '.join(p.name for p in moved)}")
        return path, state
    if moved:
        raise CheckpointError(f"no checkpoint in {folder} loads: {', '.join(p.name for p in moved)} were moved "
                              "aside; run the same command again to start this run from step 0, or put a good "
                              "state_*.pt back")
    return None


# --------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive `flock` on `<run dir>/.lock`, holding the owner's PID. The kernel releases it when the
    process exits or dies, so a crashed run never leaves a stale lock behind."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run folder {self.path.parent} is in use by process {holder}; wait for it to finish, "
                            "stop it, or choose another run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

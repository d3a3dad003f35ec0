"""Checkpoints: the full training state (resume) and a weights-only safetensors file (EMA/model).

Both are written to a temporary file in the same folder and renamed, so a crash never leaves a
half-written checkpoint; "latest" is the highest step in the file name, never the newest mtime.
The state is loaded with `torch.load(weights_only=True)`: a checkpoint can never run code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_PATTERN = re.compile(r"state_(\d{7,})\.pt$")
WEIGHTS_PATTERN = re.compile(r"weights_(\d{7,})\.safetensors$")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_state(folder: Path, step: int, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state_{step:07d}.pt"
    _atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def save_weights(folder: Path, step: int, weights: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"weights_{step:07d}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    meta = {"usp": json.dumps(metadata or {})}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


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
    """Delete all but the newest `keep_last` checkpoints of each kind (by step)."""
    for pattern in (STATE_PATTERN, WEIGHTS_PATTERN):
        for _, path in _steps(folder, pattern)[:-keep_last]:
            path.unlink(missing_ok=True)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the usp metadata (model name, task, recipe) of a `weights_*.safetensors` file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("usp", "{}"))
    return load_file(str(path)), meta


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error that names the mismatching keys and the fix."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                                       for k in wrong[:5]))
        raise ValueError(f"checkpoint {source} does not match the model ({type(model).__name__}): "
                         + "; ".join(parts) + ". Check model.name and the latent size of the recipe.")
    model.load_state_dict(state, strict=True)

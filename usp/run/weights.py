"""The one weights reader: a weights file -> a flat {key: tensor} state dict and the run's metadata.

What it reads: the `weights_<step>.safetensors` a run exports (verified against the digest stored in it; its
metadata holds the model name, task and recipe), any other safetensors file (unverified: written by another
tool), and public torch checkpoints (.pt/.pth/.bin of MAE/USP, DiT, SiT), loaded with `weights_only=True`, so a
file can never run code. A weights argument may also name a run folder, `RUN/latest` or a checkpoints folder:
the highest-step weights file in it (`resolve_weights`). Every reader of weights in the package goes through
`load_weights`; models take the state dict it returns and know no file layout.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from usp import CheckpointError
from usp.run.checkpoint import digest, latest_weights

WRAPPER_KEYS = ("ema", "model", "state_dict")  # EMA first, as DiT's sampler picks it when both exist
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A checkpoint dict -> a flat {key: tensor} state dict.

    Takes the first of 'ema', 'model', 'state_dict' that holds a mapping (MAE/USP checkpoints wrap the
    weights under 'model', DiT training checkpoints under 'model' and 'ema'), then strips a leading
    'module.' (DDP) or '_orig_mod.' (torch.compile) from every key.
    """
    for wrapper in WRAPPER_KEYS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]  # type: ignore[assignment]
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; expected a state "
                             f"dict, or a checkpoint holding one under one of {WRAPPER_KEYS}")
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def resolve_weights(path: str | Path) -> Path:
    """A weights argument (model.init, `usp sample`/`reconstruct` weights) -> one file. Accepted: a file; a run
    folder (its latest exported `checkpoints/weights_*.safetensors`); `RUN/latest`; a checkpoints folder; an
    exported timm folder (its model.safetensors) or diffusers folder (the folder itself, for `usp sample`).
    "Latest" is the highest step in the file name, as the engine names its checkpoints."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / "transformer" / "config.json").is_file() or (path / "model_index.json").is_file():
        return path  # a diffusers folder (`usp export --to diffusers`, a public DiT): usp.sample.diffusers reads it
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path / "model.safetensors"  # a timm / Hub folder (`usp export --to timm`): timm's key names
    folder = path.parent if path.name == "latest" else path
    if not folder.is_dir():
        raise FileNotFoundError(f"weights {path} does not exist: give a weights file, a run folder or RUN/latest")
    looked = [folder / "checkpoints", folder]
    for candidate in looked:
        if (found := latest_weights(candidate)) is not None:
            return found
    raise FileNotFoundError(f"no weights in {folder}: looked for weights_<step>.safetensors in "
                            f"{' and '.join(map(str, looked))}; has the run exported weights yet (train.ckpt_every)?")


def file_metadata(path: str | Path) -> dict[str, str]:
    """The raw string metadata of a safetensors file ({} for other files)."""
    path = resolve_weights(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        weights = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error type for truncated or garbage headers
        raise CheckpointError(f"weights file {path} cannot be read ({err}): it is truncated or not a safetensors "
                              "file; use another weights_*.safetensors of the run (or the file as it was "
                              "downloaded)") from err
    if "digest" in raw and raw["digest"] != digest(weights):
        raise CheckpointError(f"weights file {path} is corrupt: its tensors do not match the digest stored in it; "
                              "use another weights_*.safetensors of the run")
    return unwrap_state_dict(weights), json.loads(raw.get("usp", "{}"))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # argparse.Namespace is allowed: MAE/USP and DiT training checkpoints store their arguments beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line that matters names the refused object.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a {refused.group(1)}" if refused else "objects"
        raise CheckpointError(f"weights file {path} holds {what} that weights_only loading refuses; re-save its "
                              "state dict alone, e.g. as .safetensors") from err
    except Exception as err:  # noqa: BLE001  not a torch file or truncated: the unpickler fails in many ways
        raise CheckpointError(f"weights file {path} cannot be read ({err}): it is truncated or not a torch "
                              "checkpoint; check the file, or download it again") from err
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"weights file {path} holds a {type(checkpoint).__name__}, not a state dict")
    return unwrap_state_dict(checkpoint)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(flat state dict on the CPU, usp metadata) of a weights file, run folder or `RUN/latest` (see above).

    The metadata is what a run wrote beside its weights (model name, task, recipe); {} for other files.
    """
    path = resolve_weights(path)
    if path.is_dir():
        raise ValueError(f"{path} is a diffusers folder: `usp sample {path}` reads it; model.init takes an encoder's "
                         "weights (a usp weights file, a timm export, a public checkpoint)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in WEIGHTS_SUFFIXES:
        return _load_pickle(path), {}
    raise ValueError(f"cannot read weights {path}: suffix {path.suffix!r} is not one of {WEIGHTS_SUFFIXES}")


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

"""Recipe files and overrides: YAML (+ `base:` inheritance) and dotted `key=value` overrides into a typed,
validated `Config`; paths in a recipe resolve against the recipe's folder; the shipped recipes' location."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from usp.config.sections import Config, apply_generation_preset


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`; return it converted (int→float, list→tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):  # e.g. sample_steps: 250
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.')} must be a mapping of {', '.join(names)}")
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix}{key}; allowed under {prefix or 'the top level'}: "
                             f"{', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the `section.key=value` overrides out of a command line wherever they stand -> (the rest, overrides),
    so options and overrides mix in any order: argparse would give `--splits train val a.b=1` the override as a
    split, and refuses positionals after `--resume X`. An override names a dotted key, which no option value or
    path of usp looks like; everything after `--` is left as it is."""
    rest, overrides = [], []
    for i, token in enumerate(argv):
        if token == "--":
            return rest + argv[i:], overrides
        (overrides if _OVERRIDE.match(token) else rest).append(token)
    return rest, overrides


def apply_overrides(values: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set each dotted `key=value` in the nested dict `values` (in place; returned for chaining)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return values


def config_from_dict(values: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """A validated Config from a nested dict (e.g. the recipe stored in a checkpoint) plus overrides.

    A `generation.preset` named in `values` fills the keys `values` lacks; one named in the overrides is laid
    over `values` first, under the overrides themselves (apply_generation_preset)."""
    values = apply_generation_preset(values)
    preset = apply_generation_preset(apply_overrides({}, overrides)).get("generation")
    if isinstance(preset, dict) and preset.get("preset") not in (None, "none"):
        values = _merge(values, {"generation": {k: v for k, v in preset.items() if k != "preset"}})
    return _build(Config, apply_overrides(values, overrides), "").validate()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a key of `top` replaces the same key of `base`)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipes_dir() -> Path:
    """The shipped recipes: `usp/recipes` in an installed wheel (package data), the repository's configs/ in a
    source checkout (the wheel build copies configs/ there; see setup.py)."""
    package = Path(__file__).resolve().parents[1]  # usp/
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "configs"


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given when it exists, else a shipped recipe by name: `fmnist/pretrain`,
    `fmnist/pretrain.yaml` and `configs/fmnist/pretrain.yaml` all name configs/fmnist/pretrain.yaml."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = _shipped(path)
    if shipped is not None:
        return shipped
    raise FileNotFoundError(f"recipe {name} not found, neither as a file nor among the shipped recipes in "
                            f"{recipes_dir()}; `usp list recipes` names them (e.g. fmnist/pretrain)")


def _shipped(path: Path) -> Path | None:
    """The shipped recipe `path` names (`fmnist/pretrain`, with or without .yaml or configs/), else None."""
    relative = path.as_posix().removeprefix("configs/")
    for candidate in (relative, relative + ".yaml"):
        shipped = recipes_dir() / candidate
        if not path.is_absolute() and shipped.is_file():
            return shipped
    return None


# Recipe keys that hold paths: with run.root set they resolve against it (so a run works from any directory).
PATH_KEYS = ("run.out_dir", "latent.path", "latent.cache", "data.root", "data.exclude", "model.init",
             "generation.domain_classifier", "generation.domain_reference", "vae.out", "repa.teacher_weights",
             "repa.features_dir")


def resolve_paths(values: dict[str, Any], recipe: Path) -> dict[str, Any]:
    """Make the relative paths of a recipe dict absolute against its `run.root` (itself relative to the recipe
    file), in place; a recipe without run.root is left as it is (paths relative to the working directory).
    `latent.path` may be a hub id (owner/name): it is resolved only when written ./x or ../x, or when it exists."""
    root = (values.get("run") or {}).get("root")
    if root is None:
        return values
    root = (recipe.parent / Path(root).expanduser()).resolve()
    values["run"]["root"] = str(root)
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = values.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(name), str):
            continue
        text = node[name]
        path = Path(text).expanduser()
        if path.is_absolute():
            continue
        if key == "latent.path" and not (text.startswith(("./", "../")) or (root / path).exists()):
            continue
        if key == "repa.teacher_weights" and (text == "timm" or text.startswith("hf-hub:")):  # timm downloads these
            continue
        node[name] = str((root / path).resolve())
    return values


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file as a nested dict, with `base: other.yaml` (relative to the file, else a shipped recipe's name)
    resolved and merged under it."""
    path = Path(path)
    if not path.is_file():
        path = find_recipe(path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of sections (run:, data:, ...)")
    apply_generation_preset(values)  # this file's preset, under this file's keys, over its base's
    base = values.pop("base", None)
    if base is None:
        return values
    # A file beside this one first, else a shipped recipe by name (`base: fmnist/pretrain`, what `usp init` writes).
    beside = path.parent / base
    base_path = (beside if beside.is_file() else _shipped(Path(base)) or beside).resolve()
    if base_path in _seen:
        raise ValueError(f"recipe {path}: `base: {base}` makes a cycle ({' -> '.join(map(str, _seen))})")
    return _merge(read_recipe(base_path, (*_seen, base_path)), values)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or start from the defaults) and apply dotted overrides, then validate."""
    values = {}
    if path is not None:
        path = find_recipe(path)
        values = resolve_paths(read_recipe(path, (path.resolve(),)), path)
    return config_from_dict(values, overrides)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config.to_yaml())

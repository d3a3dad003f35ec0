"""Typed recipes: YAML files loaded into dataclasses, with dotted `key=value` overrides.

An unknown key or a value of the wrong type is a `ValueError` that names the key and what is
allowed; invariants are checked once in `Config.validate`. Every run writes its resolved recipe.
sections.py holds the dataclasses (one per YAML section) and the presets; loading.py the files, `base:`
inheritance, overrides and path resolution.

May import: nothing else of usp (layer 0: every package reads recipes).
"""

from usp.config.loading import (
    PATH_KEYS,
    apply_overrides,
    config_from_dict,
    find_recipe,
    load_config,
    parse_override,
    read_recipe,
    recipes_dir,
    resolve_paths,
    save_config,
    split_overrides,
)
from usp.config.sections import (
    GENERATION_PRESETS,
    PROBE_MIN_STEPS,
    SAMPLERS,
    TASKS,
    ClassifyConfig,
    Config,
    DataConfig,
    GenerationConfig,
    LatentConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RepaConfig,
    RunConfig,
    TaskName,
    TrainConfig,
    VaeConfig,
    apply_generation_preset,
)

__all__ = [
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "recipes_dir",
    "find_recipe",
    "PATH_KEYS",
    "resolve_paths",
    "read_recipe",
    "load_config",
    "save_config",
    "split_overrides",
    "TaskName",
    "TASKS",
    "PROBE_MIN_STEPS",
    "RunConfig",
    "LatentConfig",
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "GenerationConfig",
    "GENERATION_PRESETS",
    "SAMPLERS",
    "apply_generation_preset",
    "VaeConfig",
    "OptimConfig",
    "ClassifyConfig",
    "TrainConfig",
    "RepaConfig",
    "Config",
]

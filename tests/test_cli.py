"""The command line teaches: every command's --help renders, and every recipe under configs/ and every
example printed by `usp --help` passes --dry-run with exactly the recipe a run would use."""

from __future__ import annotations

import importlib
import inspect
import shlex
from pathlib import Path

import pytest
import yaml

from usp import cli
from usp.config import load_config, read_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))
COMMANDS = sorted(cli.build_parser()._subparsers._group_actions[0].choices)
COMMAND_OF_TASK = {task: command for command, task in cli.TRAIN_COMMANDS.items()}


def examples() -> list[str]:
    """The `usp ...` lines of `usp --help` (every command's examples), trailing comments removed."""
    lines = [line.strip() for line in cli.build_parser().epilog.splitlines() if line.strip().startswith("usp ")]
    return [line.split("#")[0].strip() for line in lines]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usp: \n") or f"usp {command}" in out
    assert "--dry-run" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS) and len(examples()) >= 8
    assert {line.split()[1] for line in examples()} == set(COMMANDS)  # an example of every command


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_recipe_dry_runs_to_its_resolved_recipe(recipe, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    command = COMMAND_OF_TASK[read_recipe(recipe)["run"]["task"]]
    cli.main([command, str(recipe.relative_to(ROOT)), "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(recipe).to_dict()


@pytest.mark.parametrize("example", examples())
def test_every_help_example_dry_runs(example, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(example)[1:]
    cli.main([*argv, "--dry-run"])
    out = capsys.readouterr().out
    assert out.strip()
    if argv[0] in cli.TRAIN_COMMANDS and not argv[1].endswith((".safetensors", ".pt")):  # a recipe, overridden
        overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
        expected = load_config(argv[1], [*overrides, f"run.task={cli.TRAIN_COMMANDS[argv[0]]}"]).to_dict()
        assert yaml.safe_load(out) == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_calls_a_function_taking_exactly_its_options(command):
    """`call` hands the parsed options to the command's function by name (a recipe as `config`): a renamed option or
    parameter fails here, not at a user's first real run (--dry-run never calls the function)."""
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]
    options = {a.dest for a in sub._actions} - {"help", "dry_run"}
    if "recipe" in options:
        options = options - {"recipe", "overrides"} | {"config"}
    function = cli.CALLS[command]
    if isinstance(function, str):
        module, name = function.split(":")
        function = getattr(importlib.import_module(module), name)
    inspect.signature(function).bind(**dict.fromkeys(options))  # raises TypeError on a missing or unknown keyword


def test_a_recipe_for_another_command_is_refused_with_the_right_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", str(ROOT / "configs/fmnist/pretrain.yaml"), "--dry-run"])
    assert exit_info.value.code == 2
    assert "run it with `usp pretrain` instead" in capsys.readouterr().err


def test_list_models_names_every_registered_model_even_of_a_size_without_a_note(monkeypatch, capsys):
    import usp.models as models

    # A size the listing has no paper/demo note for (the old table raised KeyError for it).
    monkeypatch.setitem(models.SIZES, "h", models.ModelSize(1280, 32, 16))
    monkeypatch.setitem(models.REGISTRY, "vit_h_2", models.ModelEntry("vit_h_2", "vit", "h", 2, lambda **kw: None))
    cli.main(["list", "models"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == models.list_models()  # one line per name, nothing else
    assert "vit_h_2" in lines[-1] and "width 1280" in lines[-1]
    assert lines[models.list_models().index("vit_b_2")].endswith("; paper")
    assert lines[models.list_models().index("vit_t_2")].endswith("; CPU demo / tests")

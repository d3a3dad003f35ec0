"""The package's shape: every module imports on its own (no import cycles), and the stages are layered.

Layers, low to high: the package root (errors) and config; run (the run folder's formats); models, diffusion,
data; latent; evaluate, sample; train, recipe_tools, export; demo; cli. A module may import its own package and
lower layers only (read from the source with `ast`, function-level imports included), with the exceptions in
ALLOWED_UPWARD.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import usp

PACKAGE = Path(usp.__file__).parent
MODULES = sorted(
    ".".join(("usp", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if path.name != "__main__.py"
)
LAYER = {
    "usp": 0,  # the package root: the errors a user can fix, nothing imported
    "usp.config": 0,
    "usp.run": 1,  # the run folder's formats: every stage reads and writes them, so they sit below every stage
    "usp.models": 2, "usp.diffusion": 2, "usp.data": 2,
    "usp.latent": 3,
    "usp.evaluate": 4, "usp.sample": 4,
    "usp.train": 5, "usp.recipe_tools": 5, "usp.export": 5,
    "usp.demo": 6,
    "usp.cli": 7,
}
ALLOWED_UPWARD: set[tuple[str, str]] = set()  # no exceptions: a needed upward import means a module is misplaced


def layer_of(module: str) -> tuple[str, int]:
    best = max((key for key in LAYER if module == key or module.startswith(key + ".")), key=len)
    return best, LAYER[best]


def usp_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("usp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("usp"))
    return found


def test_only_the_entry_points_sit_at_the_top_level():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "cli.py"]


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    # One interpreter; before each module every usp.* module is forgotten, so each is imported first
    # (an import cycle shows as an ImportError / AttributeError on a partially initialised module).
    script = (
        "import importlib, sys\n"
        f"names = {MODULES!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'usp' or m.startswith('usp.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(MODULES) > 30


def test_layers_import_only_downwards():
    violations = []
    for module in MODULES:
        path = PACKAGE.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        home, level = layer_of(module)
        for imported in usp_imports(path):
            other_home, other_level = layer_of(imported)
            if other_home == home or other_level < level or (module, imported) in ALLOWED_UPWARD:
                continue
            if other_level == level and home.split(".")[:2] == other_home.split(".")[:2]:
                continue  # the same package at the same layer
            violations.append(f"{module} (layer {level}) imports {imported} (layer {other_level})")
    assert not violations, "\n".join(violations)


def test_models_know_nothing_of_training_data_or_files_of_a_run():
    for path in (PACKAGE / "models").glob("*.py"):
        assert {m for m in usp_imports(path) if not m.startswith("usp.models")} == set(), path.name


PACKAGES = sorted(key.split(".")[1] for key in LAYER if key.count(".") == 1)  # config, run, models, ...


def may_import(doc: str) -> set[str]:
    """The usp packages a docstring's "May import: ..." clause names (up to its first ';', '.' or 'never'; words in
    parentheses are comments)."""
    clause = re.split(r"may import:?", doc, flags=re.IGNORECASE)[1]
    clause = re.split(r";|\.\s|\.$|\bnever\b", re.sub(r"\([^)]*\)", "", clause), flags=re.IGNORECASE)[0]
    return {name for name in PACKAGES if re.search(rf"\b{name}\b", clause)}


def test_every_package_says_what_lives_there_and_what_it_may_import():
    """Each package docstring names the usp packages it may import ("May import: ..."); every package its modules
    import (function-level imports included) is named there, and everything named lies below it."""
    problems = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        where = init.relative_to(PACKAGE.parent)
        doc = ast.get_docstring(ast.parse(init.read_text()))
        if not (doc and len(doc) > 80 and re.search(r"may import", doc, re.IGNORECASE)):
            problems.append(f"{where} needs a docstring saying what lives there and a 'May import: ...' clause")
            continue
        named = may_import(doc)
        if init.parent == PACKAGE:  # the root: its own __init__ imports nothing of usp
            imported = {m.split(".")[1] for m in usp_imports(init) if m.count(".")}
        else:
            home = init.parent.relative_to(PACKAGE).parts[0]
            imported = {m.split(".")[1] for path in init.parent.rglob("*.py") for m in usp_imports(path)
                        if m.count(".")} - {home}
            level = LAYER[f"usp.{home}"]
            above = sorted(name for name in named if LAYER[f"usp.{name}"] >= level and name != home)
            if above:
                problems.append(f"{where} says it may import {above}, which do not lie below it")
        if imported - named:
            problems.append(f"{where}: its modules import {sorted(imported - named)}, which its docstring does not "
                            f"name (it names {sorted(named)})")
    assert not problems, "\n".join(problems)


def test_the_docstring_reader_reads_the_clause_only():
    assert may_import("May import: config, run (not models), data; never train or demo.") == {"config", "run", "data"}
    assert may_import("May import: torch, numpy and `usp.config`; nothing above (no latent)") == {"config"}
    assert may_import("May import: nothing else of usp (layer 0).") == set()

"""Ships the repository's recipes (configs/) inside the package as `usp/recipes` (package data).

configs/ stays at the top of the source tree, where users and the docs expect it; at wheel build time it is copied
into the built package, so `usp pretrain fmnist/pretrain` and `usp demo` work from an installed wheel
(`usp.config.recipes_dir` finds either). Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        target = Path(self.build_lib) / "usp" / "recipes"
        if target.exists():
            shutil.rmtree(target)
        for recipe in sorted(source.rglob("*.yaml")):
            destination = target / recipe.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(recipe, destination)


setup(cmdclass={"build_py": BuildWithRecipes})

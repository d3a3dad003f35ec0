"""The built wheel carries the recipes (package data) and finds them without the source tree: a shipped recipe
by name, `usp list`, and the demo's recipe folder resolve inside the unpacked wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_finds_them_without_the_source_tree(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("usp-*.whl"))
    shipped = {Path(n).relative_to("usp/recipes").as_posix() for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("usp/recipes/")}
    assert shipped == {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the unpacked wheel only: no source tree on the path
    code = ("import usp, usp.demo.pipeline as p; from usp.config import load_config; "
            "print(usp.__file__); print(p.CONFIGS); print(load_config('fmnist/pretrain').model.name)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module, configs, model = run.stdout.split()
    assert module.startswith(str(site)) and configs == str(site / "usp" / "recipes" / "fmnist") and model == "vit_t_2"
    listed = subprocess.run([sys.executable, "-m", "usp", "list", "recipes"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0 and "fmnist/pretrain" in listed.stdout and str(site) in listed.stdout

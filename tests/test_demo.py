"""`usp demo --quick` end to end: every stage runs, the report's figures exist and are finite."""

from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from usp.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for stage in ("vae", "cache", "domain", "pretrain", "dit_usp", "dit_scratch", "sit_usp", "sit_scratch", "probe"):
        assert (out / "stages" / f"{stage}.json").is_file(), stage
        assert math.isfinite(results[stage]["seconds"])
    assert math.isfinite(results["vae"]["psnr_test"])
    for name in ("dit_usp", "dit_scratch", "sit_usp", "sit_scratch"):
        assert results[name]["evals"], name
        for record in results[name]["evals"]:
            assert math.isfinite(record["domain_fd"]) and 0.0 <= record["class_agreement"] <= 1.0
    for name in ("usp", "random_init", "raw_pixels"):
        assert 0.0 <= results["probe"][name]["fast"]["logistic_top1"] <= 100.0
    for name in ("usp", "random_init"):  # the paper's protocol, with its card
        assert 0.0 <= results["probe"][name]["paper"]["top1"] <= 100.0
        assert results["probe"][name]["paper"]["protocol"]["features"]["pooling"] == "cls token"
    # Every image the report shows exists and decodes.
    images = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(images) >= 8
    for name in images:
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 10
    # A second run skips every finished stage and writes the same numbers.
    main(["demo", "--quick", "--out", str(out)])
    assert json.loads((out / "results.json").read_text())["vae"] == results["vae"]

"""`usp demo --quick` and `usp demo --full --quick` end to end, and the verdict's arithmetic on known logs."""

from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from usp.cli import main
from usp.demo.pipeline import BUDGETS, arms
from usp.demo.verdict import family_verdict, paired_loss, steps_to_reach, verdict_sentence


def _images_decode(out, report: str, at_least: int) -> None:
    images = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(images) >= at_least
    for name in images:
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 10


@pytest.mark.slow
def test_demo_quick_then_full_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    stages = ("vae", "cache", "domain", "pretrain", "sit_usp_s0", "sit_scratch_s0", "sit_scratch_s1",
              "sit_scratch_s0_w10000", "probe")
    for stage in stages:
        assert (out / "stages" / f"{stage}.json").is_file(), stage
        assert math.isfinite(results[stage]["seconds"]) and len(results[stage]["load"]) == 2
    assert math.isfinite(results["vae"]["psnr_test"])
    assert results["pretrain"]["schedule"] == "constant"
    for name in ("sit_usp_s0", "sit_scratch_s0", "sit_scratch_s1"):
        assert results[name]["evals"], name
        for record in results[name]["evals"]:
            assert math.isfinite(record["domain_fd"]) and record["domain_fd_se"] > 0
            assert 0.0 <= record["class_agreement"] <= 1.0 and record["samples"] == BUDGETS["quick"].eval_samples
        assert (out / "logs" / name / "log.jsonl").is_file()
    for name in ("usp", "random_init", "raw_pixels"):
        assert 0.0 <= results["probe"][name]["fast"]["logistic_top1"] <= 100.0
    for name in ("usp", "random_init"):  # the paper's protocol, with its card
        assert 0.0 <= results["probe"][name]["paper"]["top1"] <= 100.0
        assert results["probe"][name]["paper"]["protocol"]["features"]["pooling"] == "cls token"
    # The verdict states every protocol field and names a band that came from the two scratch seeds.
    for field in ("EMA 0.99", "ode 5 steps (heun)", "CFG", "10 000 Fashion-MNIST test images", "bootstrap"):
        assert field in report, field
    final = results["verdict"]["sit"]["0"]["final"]
    assert final["band_unpaired"] >= abs(final["scratch"] - final["scratch_other"])
    assert final["band"] == final["band_paired"] >= abs(final["scratch"] - final["init_control"])
    assert "## Verdict" in report and "SiT, seed 0:" in report
    _images_decode(out, report, 7)
    # The logs the report copies are references `usp compare-run` reads.
    main(["compare-run", str(out / "logs" / "sit_usp_s0"), str(out / "logs" / "sit_usp_s0")])
    assert "within the reference's band" in capsys.readouterr().out

    # A second run skips every finished stage and writes the same numbers.
    main(["demo", "--quick", "--out", str(out)])
    assert json.loads((out / "results.json").read_text())["vae"] == results["vae"]

    # The reproduction's layout in the same folder: the shared stages are reused, DiT arms and a second USP seed
    # are added, and the steps-to-reach table covers both families and both seeds.
    main(["demo", "--full", "--quick", "--out", str(out)])
    full = json.loads((out / "results.json").read_text())
    assert full["mode"] == "full-quick" and full["vae"] == results["vae"]
    for family in ("dit", "sit"):
        assert set(full["verdict"][family]) == {"0", "1"}
        for seed in (0, 1):
            assert (out / "stages" / f"{family}_usp_s{seed}.json").is_file()
    report = (out / "report.md").read_text()
    assert report.count("Steps to reach scratch's final figure") == 2
    _images_decode(out, report, 12)


def test_arms_put_usp_first_and_always_two_scratch_seeds():
    keys = [arm.key for arm in arms(BUDGETS["default"], 3)]
    assert keys == ["sit_usp_s3", "sit_scratch_s3", "sit_scratch_s4", "sit_scratch_s3_w10003"]
    full = [arm.key for arm in arms(BUDGETS["full"], 0)]
    assert len(full) == 8 and full[:2] == ["dit_usp_s0", "dit_usp_s1"]


def _log(losses: dict[int, float], fds: dict[int, tuple[float, float]]):
    train = [{"step": s, "loss": v, "lr": 2e-3} for s, v in losses.items()]
    evals = [{"step": s, "domain_fd": fd, "domain_fd_se": se, "class_agreement": 0.5} for s, (fd, se) in fds.items()]
    return train, evals


def test_verdict_reads_gaps_against_the_measured_band():
    steps = (100, 200, 300, 400)
    scratch0 = _log({s: 1.0 - s / 1000 for s in steps}, {200: (100.0, 2.0), 400: (60.0, 2.0)})
    scratch1 = _log({s: 1.01 * (1.0 - s / 1000) for s in steps}, {200: (104.0, 2.0), 400: (52.0, 2.0)})
    # USP 20 % lower loss throughout; FD 45 at the end: a gain of 15 over a band of |60 - 52| = 8.
    better = _log({s: 0.8 * (1.0 - s / 1000) for s in steps}, {200: (58.0, 2.0), 400: (45.0, 2.0)})
    logs = {"sit_usp_s0": better, "sit_scratch_s0": scratch0, "sit_scratch_s1": scratch1}
    v = family_verdict(logs, "sit", [0], (0, 1))[0]
    assert v["final"]["band"] == pytest.approx(8.0) and v["final"]["gain"] == pytest.approx(15.0)
    assert v["final"]["beyond"] and v["loss"]["beyond"]
    assert v["loss"]["gain_mean"] == pytest.approx(0.2) and v["loss"]["chance_max"] == pytest.approx(0.01)
    # Scratch's final FD 60 is reached at step 200 (58); its final loss 0.6 at step 300 (0.8 * 0.7 = 0.56).
    assert v["fd_reached_at"] == 200 and v["loss_reached_at"] == 300
    # 58 at step 200 is the first evaluation: nothing before it to interpolate from.
    assert v["fd_crossing"] == 200.0
    assert "beats scratch beyond the noise band" in verdict_sentence("SiT", 0, v)
    # A gap smaller than the seed spread is inside the band, whichever way it points.
    inside = _log({s: 0.995 * (1.0 - s / 1000) for s in steps}, {200: (99.0, 2.0), 400: (55.0, 2.0)})
    logs["sit_usp_s0"] = inside
    v = family_verdict(logs, "sit", [0], (0, 1))[0]
    assert not v["final"]["beyond"] and not v["loss"]["beyond"]
    assert "inside the noise band" in verdict_sentence("SiT", 0, v)
    # With 1 000-sample bootstraps wider than the seed spread, the band is 2 x the combined error.
    wide = {"sit_usp_s0": _log({}, {400: (50.0, 5.0)}), "sit_scratch_s0": _log({}, {400: (60.0, 5.0)}),
            "sit_scratch_s1": _log({}, {400: (59.0, 5.0)})}
    assert family_verdict(wide, "sit", [0], (0, 1))[0]["final"]["band"] == pytest.approx(2 * math.sqrt(50))


def test_the_init_only_control_sets_the_paired_band_and_the_unpaired_one_is_still_reported():
    steps = (100, 200, 300, 400)
    scratch0 = _log({s: 1.0 - s / 1000 for s in steps}, {400: (60.0, 1.0)})
    scratch1 = _log({s: 1.05 * (1.0 - s / 1000) for s in steps}, {400: (50.0, 1.0)})  # unpaired: spread 10, 5 %
    control = _log({s: 1.01 * (1.0 - s / 1000) for s in steps}, {400: (57.0, 1.0)})  # init only: spread 3, 1 %
    usp = _log({s: 0.96 * (1.0 - s / 1000) for s in steps}, {400: (54.0, 1.0)})  # gain 6, loss 4 % lower
    logs = {"sit_usp_s0": usp, "sit_scratch_s0": scratch0, "sit_scratch_s1": scratch1, "sit_scratch_s0_w7": control}
    v = family_verdict(logs, "sit", [0], (0, 1), {0: "sit_scratch_s0_w7"})[0]
    final = v["final"]
    # Paired band = max(|60 - 57|, 2 * sqrt(1 + 1)) = 3; unpaired = 10. Gain 6: beyond the first, inside the second.
    assert final["band"] == pytest.approx(3.0) and final["band_unpaired"] == pytest.approx(10.0)
    assert final["beyond"] and not final["beyond_unpaired"]
    # Loss: gain 4 % vs chance 1 % against the control (beyond), vs 5 % between scratch seeds (not beyond).
    assert v["loss"]["chance_max"] == pytest.approx(0.01) and v["loss"]["chance_unpaired_max"] == pytest.approx(0.05)
    assert v["loss"]["beyond"] and not v["loss"]["beyond_unpaired"]
    text = verdict_sentence("SiT", 0, v)
    assert "beats scratch beyond the noise band" in text and "does NOT clear" in text
    assert "NOT beyond the unpaired gap" in text
    # Without the control the same logs are read against the unpaired band, as before.
    v = family_verdict(logs, "sit", [0], (0, 1))[0]
    assert v["final"]["band"] == pytest.approx(10.0) and not v["final"]["beyond"]


def test_the_interpolated_crossing_lies_between_the_evaluations_that_bracket_the_target():
    from usp.demo.verdict import crossing_step

    records = [{"step": 250, "domain_fd": 90.0}, {"step": 500, "domain_fd": 70.0}, {"step": 750, "domain_fd": 63.3},
               {"step": 1000, "domain_fd": 49.2}]
    # 62.5 is crossed between 750 (63.3) and 1000 (49.2): 750 + 250 * 0.8 / 14.1 = 764.18...
    assert crossing_step(records, 62.5) == pytest.approx(750 + 250 * 0.8 / 14.1)
    assert steps_to_reach(records, 62.5) == 1000 and crossing_step(records, 10.0) is None


def test_paired_loss_and_steps_to_reach_edge_cases():
    assert paired_loss([], [], [])["rows"] == []
    assert steps_to_reach([{"step": 1, "domain_fd": math.nan}, {"step": 2, "domain_fd": 5.0}], 5.0) == 2
    assert steps_to_reach([{"step": 1, "domain_fd": 6.0}], 5.0) is None

"""scripts/rehearse.py end to end at reduced sizes: stand-in tree and random weights in the real layouts, a
pretraining, a cached fine-tune with REPA's teacher online, the probe, then sample / reference / evaluate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rehearse.py"


@pytest.mark.slow
def test_rehearsal_runs_every_stage_at_reduced_size(tmp_path):
    spec = importlib.util.spec_from_file_location("rehearse", SCRIPT)
    rehearse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearse)
    recipes = ["pretrain/vit_b_2_sdvae_224", "finetune/sit_b_2_usp_repa_256", "probe/vit_b_2_sdvae_224"]
    status = rehearse.main(["--out", str(tmp_path), "--reduced", "--classes", "4", "--only", *recipes])
    rows = json.loads((tmp_path / "rehearsal.json").read_text())
    assert status == 0, rows
    stages = [row["stage"] for row in rows]
    assert stages == ["pretrain/vit_b_2_sdvae_224", "cache/sd-vae-ft-mse-64", "finetune/sit_b_2_usp_repa_256",
                      "probe/vit_b_2_sdvae_224", "sample", "reference", "evaluate"]
    assert all(row["exit"] == 0 and row["peak_gib"] > 0 for row in rows)
    # Each training stage has a prediction at the recipe's own per-GPU batch (global batch / 8 GPUs).
    predicted = {row["stage"]: row["per_gpu_batch"] for row in rows if "per_gpu_batch" in row}
    assert predicted == {"pretrain/vit_b_2_sdvae_224": 4096 // 8, "finetune/sit_b_2_usp_repa_256": 256 // 8,
                         "probe/vit_b_2_sdvae_224": 16384 // 8}
    # Each training stage records the estimate its run printed at the rehearsal's batch; the sampled fine-tune is named.
    assert all(isinstance(row.get("estimate_gib"), float) for row in rows if row["stage"] in predicted)
    assert {row.get("of") for row in rows[-3:]} == {"finetune/sit_b_2_usp_repa_256"}
    assert "\n3 of 42 shipped recipes exit 0; not yet: pretrain/vit_b_1_kl16_256, " in rehearse.table(tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())  # the evaluation wrote its metrics
    # The fine-tune started from the rehearsal's own pretraining run (model.init), not from scratch.
    log = (tmp_path / "logs" / "finetune-sit_b_2_usp_repa_256.log").read_text()
    assert f"model.init={tmp_path / 'runs' / 'pretrain-vit_b_2_sdvae_224'}" in log

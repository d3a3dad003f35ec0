"""benchmarks/: the comparisons with the official code compute equal losses from the same weights (when a checkout
is named by USP_OFFICIAL_USP / USP_OFFICIAL_DIT / USP_OFFICIAL_SIT; skipped otherwise), the timer interleaves,
the peak is the best matmul, the loss check refuses different functions, and one cheap table comes out whole.
No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402
import bench_common as common  # noqa: E402
import official  # noqa: E402
import suite  # noqa: E402

from usp.models import create_model


def _official(kind: str):
    loaded = official.from_env(kind)
    if loaded is None:
        pytest.skip(f"set {official.ENV[kind]} to a checkout of the official code to compare with it")
    return loaded


def test_official_usp_mae_computes_usps_loss_from_the_same_weights():
    ref_code = _official("usp")
    torch.manual_seed(0)
    model = create_model("vit_t_2", latent_size=8, in_channels=4)
    ref = official.official_mae(ref_code, model)
    x = torch.randn(3, 4, 8, 8)
    torch.manual_seed(5)
    noise = torch.rand(3, 16)  # what the official random_masking draws after the same seed
    expected = model(x, 0.75, noise=noise)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(ref(x, 0.75)[0], expected, rtol=1e-5, atol=1e-6)
    assert np.float32 is np.dtype("float32").type  # the official import's global NumPy shim is undone


@pytest.mark.parametrize("family", ["dit", "sit"])
def test_official_generator_computes_usps_output_and_loss(family):
    ref_code = _official(family)
    torch.manual_seed(0)
    model = common.randomise_zero_init(create_model(f"{family}_t_2", input_size=8))
    ref = official.official_generator(ref_code, model, family)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(7)  # label dropout (training mode) draws the same labels in both
    expected = model(x, t if family == "dit" else t / 1000, y)
    torch.manual_seed(7)
    torch.testing.assert_close(ref(x, t if family == "dit" else t / 1000, y), expected, rtol=1e-5, atol=1e-6)
    if family == "dit":  # DiT's learned-sigma hybrid loss through each side's own diffusion code
        from usp.diffusion import create_diffusion

        model.eval(), ref.eval()
        noise = torch.randn_like(x)
        ours = create_diffusion(None).training_losses(lambda a, s: model(a, s, y), x, t, noise)["loss"]
        theirs = ref_code.diffusion.create_diffusion("").training_losses(ref, x, t, dict(y=y), noise)["loss"]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_official_loader_names_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="facebookresearch/DiT"):
        official.load_dit(tmp_path)


def test_baselines_agree_with_usp():
    from usp.evaluate.metrics import compute_statistics, frechet_distance, inception_score

    rng = np.random.default_rng(0)
    mu1, s1 = compute_statistics(rng.standard_normal((200, 8)))
    mu2, s2 = compute_statistics(1.3 * rng.standard_normal((200, 8)) + 0.2)
    assert baselines.frechet_from_eigenvalues(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2),
                                                                                  rel=1e-8)
    logits = rng.standard_normal((50, 10)) * 3
    assert baselines.inception_score(logits, 20) == pytest.approx(inception_score(logits, 20), rel=1e-10)
    from usp.models.vit import Attention

    attn, x = Attention(16, 2), torch.randn(2, 5, 16)
    torch.testing.assert_close(baselines.explicit_attention(attn, x), attn(x), rtol=1e-5, atol=1e-6)


def test_check_losses_refuses_different_functions():
    loss, delta = common.check_losses(lambda: torch.tensor(2.0), lambda: torch.tensor(2.0 + 1e-6))
    assert loss == 2.0 and delta < 1e-5
    with pytest.raises(AssertionError, match="differ"):
        common.check_losses(lambda: torch.tensor(2.0), lambda: torch.tensor(2.01))


def test_measure_runs_warmup_then_interleaved_iterations():
    calls: list[str] = []
    timings = common.measure({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                             torch.device("cpu"), warmup=1, iters=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert timings["a"].first == 1 and timings["b"].first == 2 and len(timings["a"].times) == 2
    ratios = common.pair_ratios(common.Timing([2.0, 3.0], None, None), common.Timing([4.0, 2.0], None, None))
    assert ratios == [0.5, 1.5] and common.ratio_cell(ratios) == "1.00 [0.500 – 1.50]"


def test_peak_is_the_best_call_at_every_thread_count():
    peak = common.measure_peak(torch.device("cpu"), torch.float32, 64, max_threads=2, iters=3)
    assert sorted(peak.by_threads) == [1, 2]
    assert all(best >= median > 0 for best, median in peak.by_threads.values())
    assert peak.best == max(best for best, _ in peak.by_threads.values())


def test_metrics_table_smoke(tmp_path, capsys):
    out = tmp_path / "bench.md"
    suite.main(["--quick", "--only", "metrics", "--device", "cpu", "--threads", "1",
                "--metric-samples", "300", "--metric-dim", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text().strip().endswith(printed.strip().splitlines()[-1])
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "ratio" in header
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) >= 4  # statistics, Fréchet distance (per method), IS, precision/recall
    for row in rows:
        for column in ("usp s", "baseline s", "ratio"):
            value = float(row[header.index(column)].replace(",", ""))
            assert math.isfinite(value) and value >= 0

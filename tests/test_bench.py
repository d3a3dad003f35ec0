"""`benchmarks/suite.py`: the naive references compute usp's function, the FLOP counter matches a hand count, and one
cheap table comes out whole. No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import suite as bench  # noqa: E402

from usp.diffusion import create_diffusion
from usp.models import create_model
from usp.models.dit import DiT
from usp.models.mae import MaskedLatentAutoencoder

naive = bench.reference_models()


def tiny_mae() -> MaskedLatentAutoencoder:
    # 4×4×1 latents, patch 2 -> L = 4 tokens; width 8 everywhere, one block each side.
    return MaskedLatentAutoencoder(latent_size=4, in_channels=1, patch_size=2, embed_dim=8, depth=1, num_heads=2,
                                   decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def tiny_dit(**kwargs) -> DiT:
    return DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=2, num_classes=3, **kwargs)


def test_naive_mae_computes_usps_loss_from_the_same_weights():
    torch.manual_seed(0)
    model = create_model("vit_t_2", latent_size=8, in_channels=4)
    ref = naive.NaiveMAE.from_usp(model)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())
    x, noise = torch.randn(3, 4, 8, 8), torch.rand(3, 16)
    expected = model(x, 0.75, noise=noise)[0]
    got = ref(x, 0.75, noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got.backward()  # the reference trains: every trainable parameter receives a gradient
    assert all(p.grad is not None for p in ref.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["dit_t_2", "sit_t_2"])
@pytest.mark.parametrize("affine_norms", [False, True])
def test_naive_dit_computes_usps_output_and_loss(name, affine_norms):
    torch.manual_seed(0)
    model = bench.randomise_zero_init(create_model(name, input_size=8, affine_norms=affine_norms))
    ref = naive.NaiveDiT.from_usp(model)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(7)  # label dropout (training mode) draws the same labels in both
    expected = model(x, t, y)
    torch.manual_seed(7)
    torch.testing.assert_close(ref(x, t, y), expected, rtol=1e-5, atol=1e-5)
    if name.startswith("dit"):  # DiT's learned-sigma hybrid loss through both
        diffusion, noise = create_diffusion(None), torch.randn_like(x)
        losses = [diffusion.training_losses(lambda a, s, net=net: net(a, s, y), x, t, noise)["loss"].mean()
                  for net in (model.eval(), ref.eval())]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_fid_candidate_and_is_baseline_agree_with_usp():
    from usp.evaluate.metrics import compute_statistics, frechet_distance, inception_score

    rng = np.random.default_rng(0)
    mu1, s1 = compute_statistics(rng.standard_normal((200, 8)))
    mu2, s2 = compute_statistics(1.3 * rng.standard_normal((200, 8)) + 0.2)
    assert naive.frechet_from_eigenvalues(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2),
                                                                              rel=1e-8)
    logits = rng.standard_normal((50, 10)) * 3
    assert naive.inception_score(logits, 20) == pytest.approx(inception_score(logits, 20), rel=1e-10)


def test_check_losses_refuses_different_functions():
    loss, delta = bench.check_losses(lambda: torch.tensor(2.0), lambda: torch.tensor(2.0 + 1e-6))
    assert loss == 2.0 and delta < 1e-5
    with pytest.raises(AssertionError, match="differ"):
        bench.check_losses(lambda: torch.tensor(2.0), lambda: torch.tensor(2.01))


def test_mae_flops_match_a_hand_count():
    model = tiny_mae()
    # D = 8, MLP 32: a block's matmul weights are qkv 8·24 + proj 8·8 + fc1 8·32 + fc2 32·8 = 768.
    # mask 0.5 of L = 4: the encoder sees cls + 2 tokens (T = 3), the decoder cls + 4 (T = 5).
    patch_embed = 2 * (1 * 2 * 2 * 8) * 4  # all 4 patches, 4-vector -> 8
    encoder = 2 * 768 * 3 + 4 * 3**2 * 8
    decoder_embed = 2 * (8 * 8) * 3
    decoder = 2 * 768 * 5 + 4 * 5**2 * 8
    decoder_pred = 2 * (8 * 4) * 5
    forward = patch_embed + encoder + decoder_embed + decoder + decoder_pred
    assert forward == 14_336
    assert bench.mae_step_flops(model, batch=2, mask_ratio=0.5) == 3 * forward * 2
    assert bench.mae_tokens(model, mask_ratio=0.5) == 3 + 5


def test_dit_flops_match_a_hand_count():
    model = tiny_dit()  # learned sigma: 2 output channels; L = 4 tokens; one conditioning vector per image
    x_embed = 2 * (1 * 2 * 2 * 8) * 4
    t_mlp = 2 * (256 * 8 + 8 * 8)  # 256 sinusoidal features -> 8 -> 8, on one vector
    block = 2 * 768 * 4 + 4 * 4**2 * 8 + 2 * (8 * 6 * 8)  # token linears, attention, adaLN on c
    final = 2 * (8 * 2 * 2 * 2) * 4 + 2 * (8 * 2 * 8)
    forward = x_embed + t_mlp + block + final
    assert forward == 12_672
    assert bench.dit_step_flops(model, batch=3) == 3 * forward * 3


def test_measure_runs_warmup_then_interleaved_iterations():
    calls: list[str] = []
    timings = bench.measure({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                            torch.device("cpu"), warmup=1, iters=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert timings["a"].first == 1 and timings["b"].first == 2 and len(timings["a"].times) == 2


def test_metrics_table_smoke(tmp_path, capsys):
    out = tmp_path / "bench.md"
    bench.main(["--quick", "--only", "metrics", "--device", "cpu", "--threads", str(torch.get_num_threads()),
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

"""The per-device peak-memory estimate printed at the start of a run (usp.train.memory), and the memory bounds
that follow the recipe (latent.vae_batch splits every VAE call)."""

from __future__ import annotations

import torch
import torch.nn as nn

from usp.train.memory import activation_bytes, estimate_peak, repeat_batch


class _MLPTask:
    """x (N, D) -> Linear(D, H) -> GELU -> Linear(H, 1) -> mean: a loss whose saved tensors are countable."""

    def __init__(self, dim: int, hidden: int):
        self.model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def loss(self, model, batch):
        return {"loss": model(batch["x"]).mean()}


def test_activation_bytes_match_a_hand_count():
    # Autograd saves x (N, D) for the first weight's gradient, the GELU input (N, H) and its output (N, H) for
    # the second weight's gradient: 4 bytes × N × (D + 2H) in fp32; the weights themselves are not counted.
    n, d, h = 32, 24, 40
    task = _MLPTask(d, h)
    batch = repeat_batch({"x": torch.randn(1, d)}, n)
    assert activation_bytes(task, batch, torch.device("cpu"), None) == 4 * n * (d + 2 * h)


def test_estimate_adds_weights_gradients_optimizer_and_ema_and_leaves_the_model_untouched():
    task = _MLPTask(24, 40)
    task.model[0].requires_grad_(False)  # a frozen part: weights and EMA, no gradient, no optimiser state
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    numel = sum(p.numel() for p in task.model.parameters())
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    est = estimate_peak(task, "adamw", True, 8, torch.device("cpu"), None, {"x": torch.randn(1, 24)})
    assert est.parts["weights"] == 4 * numel and est.parts["ema"] == 4 * numel
    assert est.parts["gradients"] == 4 * trainable and est.parts["optimizer"] == 2 * 4 * trainable
    # Frozen first layer: nothing before the second layer needs a gradient, so autograd saves only that layer's
    # input (the GELU output, 8 × 40 floats) for its weight's gradient.
    assert est.parts["activations"] == 4 * 8 * 40
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    assert "GiB" in est.line()


def test_vae_calls_are_split_by_max_batch_with_the_same_result(tiny_vae_dir):
    from usp.latent.vae import LatentSpace

    whole = LatentSpace.load("small-f4", str(tiny_vae_dir), max_batch=64)
    split = LatentSpace.load("small-f4", str(tiny_vae_dir), max_batch=3)
    images = torch.rand(7, 3, 32, 32) * 2 - 1
    calls = []
    original = split.vae.encode
    split.vae.encode = lambda x: (calls.append(len(x)), original(x))[1]
    torch.testing.assert_close(split.moments(images), whole.moments(images), rtol=1e-5, atol=1e-5)
    assert calls == [3, 3, 1]
    latents = whole.encode(images)
    torch.testing.assert_close(split.decode(latents), whole.decode(latents), rtol=1e-5, atol=1e-5)


# The estimate against a measured peak RSS is benchmarks/bench_memory_estimate.py: on this VM one run's RSS measured
# 1.15x the estimate alone and 0.49x after other tests in the same session (cause not found), too noisy for a test.

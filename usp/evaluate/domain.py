"""A domain feature extractor for small data (Fashion-MNIST), where Inception features mean little.

A tiny CNN classifier is trained (`train_domain_cnn`, the one trainer) on Fashion-MNIST (32x32, RGB copies of the
grey images, in [-1, 1]; `train_domain_classifier`) or on the classes of `usp demo --data`; its penultimate
activations play the role of Inception's pool3 and its predictions the role of the class check.

**Not comparable to Inception FID.** The "domain FD" is the Fréchet distance between Gaussian fits of *this*
network's 128-d features: its scale depends on this network and its training run, so compare domain FDs only
between runs evaluated with the same classifier file, and never with FID values from papers.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from usp.data.fashion_mnist import load_fashion_mnist, to_rgb32
from usp.evaluate.metrics import compute_statistics, frechet_distance

log = logging.getLogger(__name__)
FEATURE_DIM = 128
NUM_CLASSES = 10


class DomainCNN(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> logits (N, 10); `features` gives the (N, 128) penultimate activations.

    Three strided conv-BN-ReLU stages (32 -> 16 -> 8 -> 4) and a 128-unit hidden layer: about 0.8 MMAC per
    image, so two to three epochs on two CPU cores take about a minute (the point of this network)."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()

        def stage(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *stage(3, width, 5),  # (N, w, 16, 16)
            *stage(width, 2 * width, 3),  # (N, 2w, 8, 8)
            *stage(2 * width, 4 * width, 3),  # (N, 4w, 4, 4)
        )
        self.hidden = nn.Linear(4 * width * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(self.body(x).flatten(1)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, 10)


def _as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) or float (N, 3, 32, 32) in [-1, 1] -> float (N, 3, 32, 32) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-2:] != (32, 32):  # `usp demo --data` at other sizes
        x = F.interpolate(x.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise ValueError(f"expected float (N, 3, 32, 32) in [-1, 1] or uint8 (N, 32, 32, 3), got {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


def train_domain_classifier(
    out_path: str | os.PathLike,
    epochs: int = 3,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 128,
    lr: float = 2e-3,
    root: str | os.PathLike | None = None,
    num_threads: int | None = None,
    limit: int | None = None,
) -> tuple[DomainCNN, float]:
    """`train_domain_cnn` on Fashion-MNIST: the training split (its first `limit` images: smoke tests) for
    `epochs` epochs, scored on the test split -> (model, test accuracy).

    `num_threads` sets torch's CPU threads for the duration of the call only: on a busy two-core machine one
    thread trained about 8x faster than two, whose OpenMP workers spin against each other."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        train_x, train_y = load_fashion_mnist(root, "train")
        test_x, test_y = load_fashion_mnist(root, "test")
        x, y = to_rgb32(train_x[:limit]), torch.from_numpy(train_y[:limit])  # (N, 3, 32, 32), (N,)
        steps = epochs * max(1, len(x) // batch_size)
        return train_domain_cnn(x, y, to_rgb32(test_x), torch.from_numpy(test_y), out_path, steps, seed=seed,
                                batch_size=batch_size, lr=lr, device=device, dataset="fashion_mnist")
    finally:
        torch.set_num_threads(previous_threads)


def train_domain_cnn(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     out_path: str | os.PathLike, steps: int, num_classes: int = NUM_CLASSES, seed: int = 0,
                     batch_size: int = 128, lr: float = 2e-3, device: str = "cpu",
                     dataset: str = "folder") -> tuple[DomainCNN, float]:
    """Train `DomainCNN` on x: (N, 3, 32, 32) in [-1, 1] with labels y: (N,) for `steps` Adam steps (one-cycle lr),
    in epochs of seeded permutations (a step takes the next `batch_size` images of the current one, the rest of an
    epoch is dropped); save it atomically as safetensors, `num_classes` and the test accuracy in its metadata
    (what `DomainEvaluator.load` reads) -> (model in eval mode, accuracy on test_x, test_y)."""
    if steps < 1:
        raise ValueError(f"the domain classifier needs at least 1 step, got {steps}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DomainCNN(num_classes=num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    per_epoch = max(1, len(x) // batch_size)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % per_epoch == 0:
            log.info("domain classifier epoch %d: loss %.4f (%.0f s)", (step + 1) // per_epoch, loss.item(),
                     time.perf_counter() - start)
    accuracy = _accuracy(model, test_x, test_y, device)
    seconds = time.perf_counter() - start
    log.info("domain classifier: test accuracy %.4f after %d steps, %.0f s", accuracy, steps, seconds)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"test_accuracy": f"{accuracy:.6f}", "steps": str(steps), "epochs": f"{steps / per_epoch:g}",
            "seed": str(seed), "train_seconds": f"{seconds:.1f}", "dataset": dataset,
            "feature_dim": str(FEATURE_DIM), "num_classes": str(num_classes), "train_images": str(len(x))}
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, out_path)
    return model.eval(), accuracy


class DomainEvaluator:
    """A trained `DomainCNN` used as a feature extractor and classifier for generated Fashion-MNIST images."""

    def __init__(self, model: DomainCNN, device: str | torch.device = "cpu", metadata: dict[str, str] | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata or {}

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> DomainEvaluator:
        """Load a classifier written by `train_domain_classifier` (strict: every key must match)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        model = DomainCNN(num_classes=int(metadata.get("num_classes", NUM_CLASSES)))  # `usp demo --data`: its classes
        model.load_state_dict(load_file(str(path)), strict=True)
        return cls(model, device, metadata)

    @torch.no_grad()
    def _run(self, images: np.ndarray | torch.Tensor, fn, batch_size: int) -> torch.Tensor:
        x = _as_model_input(images)
        return torch.cat([fn(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)])

    def features(self, images: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
        """Penultimate activations (N, 128) float32 of images (see `_as_model_input` for accepted forms)."""
        return self._run(images, self.model.features, batch_size).numpy()

    def statistics(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the features of `images`: one side of the domain Fréchet distance."""
        return compute_statistics(self.features(images))

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
        """Predicted class (N,) int64."""
        return self._run(images, self.model, batch_size).argmax(1).numpy()


def domain_metrics(
    evaluator: DomainEvaluator,
    fake_images: np.ndarray | torch.Tensor,
    fake_labels: np.ndarray | torch.Tensor | None,
    real: np.ndarray | torch.Tensor | tuple[np.ndarray, np.ndarray],
    bootstrap: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """`domain_fd`: Fréchet distance of the classifier's features, fake vs real (NOT comparable to Inception
    FID); `domain_fd_se`: its sampling error, the standard deviation of the FD over `bootstrap` resamples (with
    replacement) of the fake features, the real side held fixed (0 turns it off: NaN); `class_agreement`: fraction
    of fake images the classifier assigns to the label they were generated for (NaN without labels);
    `samples`: how many fake images. `real` is images, or their `evaluator.statistics` when reused across calls.

    Why a bootstrap: the FD of a few hundred samples moves by several units when only the sample seeds change,
    so a gap between two runs means something only beside this error (it is the sample-size part of the noise;
    the training-seed part needs a second run)."""
    features = evaluator.features(fake_images)  # (N, 128)
    mu_r, sigma_r = real if isinstance(real, tuple) else evaluator.statistics(real)
    fd = frechet_distance(*compute_statistics(features), mu_r, sigma_r)  # ADM's sqrtm path, as before
    spread = float("nan")
    if bootstrap > 1:
        rng = np.random.default_rng(seed)  # the eigh path: the same value to ~1e-9, ~10x faster than sqrtm
        draws = [frechet_distance(*compute_statistics(features[rng.integers(0, len(features), len(features))]),
                                  mu_r, sigma_r, matrix_sqrt="eigh") for _ in range(bootstrap)]
        spread = float(np.std(draws, ddof=1))
    agreement = float("nan")
    if fake_labels is not None:
        labels = np.asarray(fake_labels).reshape(-1)
        agreement = float((evaluator.predict(fake_images) == labels).mean())
    return {"domain_fd": fd, "domain_fd_se": spread, "class_agreement": agreement, "samples": float(len(features))}

"""Inception-V3 features as ADM's evaluator uses them, from torch-fidelity's TensorFlow-compatible port.

ADM runs the 2015-12-05 TensorFlow graph (`classify_image_graph_def.pb`); torch-fidelity's
`FeatureExtractorInceptionV3` holds the same weights converted to PyTorch, with TF's bilinear resize to 299 and
TF's pooling quirks, so its features match the graph's to float32 precision. Three outputs per image:

| ADM tensor          | here       | shape           | metric           |
| ------------------- | ---------- | --------------- | ---------------- |
| `pool_3:0`          | `pool`     | (N, 2048)       | FID, precision/recall |
| `softmax/logits/MatMul` (no bias) | `logits` | (N, 1008) | IS (softmax taken in `inception_score`) |
| `mixed_6/conv:0[..., :7]` | `spatial` | (N, 7·17·17 = 2023) | sFID |

Logits: ADM's `_create_softmax_graph` multiplies pool3 by the weight of `softmax/logits/MatMul` and takes the
softmax *without the bias*, over all 1008 outputs of the graph (1000 ImageNet classes plus 8 unused ones).
torch-fidelity's `logits_unbiased` is exactly pool3 @ fc.weight.T over 1008 outputs, so it is used as is.

Spatial: in the TF graph the seventeen-by-seventeen Inception blocks are `mixed_4` … `mixed_7`, which
torch-fidelity's own weight converter (`utils/util_convert_inception_weights.py`) maps to `Mixed_6b` … `Mixed_6e`;
it maps `mixed_6/conv/{conv2d_params,batchnorm}` to `Mixed_6d.branch1x1`. The tensor `mixed_6/conv:0` is the
output of that layer's scope (conv -> batch norm -> ReLU), i.e. the output of `Mixed_6d.branch1x1`
(`BasicConv2d` = conv, BN, ReLU): (N, 192, 17, 17). ADM keeps channels `[..., :7]` of the NHWC tensor and
flattens it row-major, so here the first 7 channels are taken and flattened channels-last: index
(h·17 + w)·7 + c. The block is certain from the converter's name map; that `:0` is the post-ReLU tensor is
inferred from the graph's naming (every conv scope ends in its ReLU, named after the scope) and is the one
point not verified numerically against TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE
WEIGHTS_ENV = "USP_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7  # ADM: `spatial[..., :7]`
POOL_DIM, LOGITS_DIM, SPATIAL_DIM = 2048, 1008, SPATIAL_CHANNELS * 17 * 17


@dataclass
class InceptionOutputs:
    """Features of N images: `pool (N, 2048)`, `logits (N, 1008)` (bias-free), `spatial (N, 2023)`; float32."""

    pool: np.ndarray
    logits: np.ndarray
    spatial: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)

    @classmethod
    def concat(cls, parts: list[InceptionOutputs]) -> InceptionOutputs:
        if not parts:
            return cls(np.zeros((0, POOL_DIM), np.float32), np.zeros((0, LOGITS_DIM), np.float32),
                       np.zeros((0, SPATIAL_DIM), np.float32))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pool", "logits", "spatial")))


def resolve_weights(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The Inception weights file: `path`, else `$USP_INCEPTION_WEIGHTS`, else torch hub's cache (downloading it
    there when `download`). Raises `FileNotFoundError` saying what to fetch and where to point when none works."""
    how = (
        f"Fetch {WEIGHTS_URL} on a machine that is online and pass its path (`inception_weights=` / "
        f"`--inception-weights`) or set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}."
    )
    for given, source in ((path, "the given path"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"Inception weights not found at {given} ({source}). {how}")
            return Path(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return cached
    if download:
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=False)
            return cached
        except Exception as err:  # no network, proxy, disk: all end in the same advice
            raise FileNotFoundError(f"Could not download the Inception weights ({err}). {how}") from err
    raise FileNotFoundError(f"Inception weights not found (looked in {cached}). {how}")


def save_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised Inception state dict with the layout of the real weights, for tests and
    offline smoke runs (its features are meaningless). Built from torchvision's Inception3, whose parameter
    names and shapes equal torch-fidelity's; conv weights get a fan-in scaled normal so activations stay O(1)."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=LOGITS_DIM)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            value = torch.randn_like(value) * (2.0 / fan_in) ** 0.5
        state[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


class InceptionFeatures:
    """ADM's three Inception outputs for uint8 images `(N, H, W, 3)` of any size (resized to 299 inside,
    with TensorFlow-1 compatible bilinear interpolation, as ADM feeds its graph)."""

    def __init__(self, extractor: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = extractor.to(self.device).eval()
        self._spatial: torch.Tensor | None = None
        # mixed_6/conv:0 is Mixed_6d.branch1x1's output (see the module docstring); catch it on the way through
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)

    @classmethod
    def from_weights(
        cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu", download: bool = True
    ) -> InceptionFeatures:
        """Load torch-fidelity's InceptionV3 from `path` (or as `resolve_weights` finds it). The file must be a
        plain tensor state dict (it is read with `weights_only=True` before torch-fidelity reads it)."""
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights = resolve_weights(path, download)
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{weights} is not a tensor-only state dict readable with weights_only=True") from err
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        )
        return cls(net, device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> InceptionOutputs:
        """One batch: uint8 `images (N, H, W, 3)` -> `InceptionOutputs`."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8, as torch-fidelity wants
        pool, logits = self.net(x)  # (N, 2048), (N, 1008)
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 17·17·7) channels-last, as ADM
        self._spatial = None
        return InceptionOutputs(
            pool.float().cpu().numpy(), logits.float().cpu().numpy(), spatial.float().cpu().numpy()
        )

    def extract(
        self,
        images: np.ndarray | Iterable[np.ndarray],
        batch_size: int = 50,
        progress: bool = False,
        total: int | None = None,
    ) -> InceptionOutputs:
        """All features of `images`: a uint8 array (N, H, W, 3) or an iterable of such batches."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if total is None and isinstance(images, np.ndarray):
            total = len(images)
        parts = []
        with tqdm(total=total, disable=not progress, unit="img", desc="inception") as bar:
            for batch in _batches(images, batch_size):
                parts.append(self(batch))
                bar.update(len(batch))
        return InceptionOutputs.concat(parts)

"""Did USP pretraining in LightningDiT's shape learn features? A fast read-out of the `vit_t_2_lightning` encoder
that scripts/lightningdit_fmnist.py pretrained, against the same encoder at random init (the demo's fast probe:
logistic regression and k-NN on the frozen cls token after the final norm, every test image; `usp probe` has no
classifier of LightningDiT's blocks, so the encoder of the pretraining model is read directly, unmasked).

    python scripts/lightning_encoder_readout.py lightning_out [--train-images 10000]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def features(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out, labels = [], []
    for batch in data.eval_batches(list(range(len(data.dataset))), 500):
        encoded, _, _ = model.forward_encoder(data.latents(batch), mask_ratio=0.0)
        out.append(encoded[:, 0])  # the cls token after the final norm, as the demo's probe reads vit_t_2
        labels.append(batch["label"])
    return torch.cat(out), torch.cat(labels)


def readout(out: Path, train_images: int) -> dict:
    from safetensors.torch import load_file

    from usp.config import load_config, recipes_dir
    from usp.evaluate.probes import knn_accuracy, logistic_regression
    from usp.latent.data import LatentData
    from usp.models import create_model
    from usp.run.checkpoint import latest_weights

    config = load_config(recipes_dir() / "fmnist" / "probe.yaml", [
        f"latent.path={out / 'vae'}", f"latent.cache={out / 'latents'}", f"data.limit={train_images}",
        "data.num_workers=0"])
    train_data = LatentData(config, config.data.split, augment=False)
    test_data = LatentData(config, config.data.eval_split, augment=False)
    weights = latest_weights(out / "runs" / "fmnist-pretrain-lightning" / "checkpoints")
    results = {"weights": str(weights), "train_images": len(train_data.dataset), "test_images": len(test_data.dataset)}
    for name in ("usp", "random_init"):
        torch.manual_seed(0)
        model = create_model("vit_t_2_lightning", ("vit_lightning",), latent_size=train_data.latent_size,
                             in_channels=train_data.spec.channels)
        if name == "usp":
            model.load_state_dict(load_file(str(weights)), strict=True)
        start = time.perf_counter()
        train_x, train_y = features(model, train_data)
        test_x, test_y = features(model, test_data)
        results[name] = {"logistic_top1": logistic_regression(train_x, train_y, test_x, test_y)["top1"],
                         "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y)["top1"],
                         "seconds": round(time.perf_counter() - start, 1)}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-images", type=int, default=10000)
    args = parser.parse_args()
    print(json.dumps(readout(args.out, args.train_images), indent=1))

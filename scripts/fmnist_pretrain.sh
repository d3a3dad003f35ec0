#!/usr/bin/env bash
# The embedded default's pretraining: small VAE (once) → latent cache (once) → USP pretraining.
# Each step is skipped or resumed when its output already exists.
set -euo pipefail
cd "$(dirname "$0")/.."
usp=.venv/bin/usp
[ -f runs/fmnist-vae/vae/latent_stats.json ] || $usp train-vae configs/fmnist/vae.yaml
$usp cache-latents configs/fmnist/pretrain.yaml --splits train test
$usp pretrain configs/fmnist/pretrain.yaml "$@"
$usp reconstruct "$(ls runs/fmnist-pretrain/checkpoints/weights_*.safetensors | tail -1)" --out runs/fmnist-pretrain/reconstruction.png

#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: Fashion-MNIST from Debian, a venv with usp installed.
# Idempotent: a second run only checks. Uses pip (capped at torch 2.14.1 on these machines).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist' or set USP_FASHION_MNIST" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import usp, torch, torchvision, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install -q --no-compile --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q --no-compile --disable-pip-version-check -e ".[test]"
fi

#!/usr/bin/env bash
# Regenerate tests/fixtures/torch_{mlp,conv}{,_io}.safetensors with real PyTorch.
# Creates a venv outside the repo (default /tmp/torchenv, override with
# TORCH_VENV) if it does not exist yet, then runs scripts/torch-fixture.py
# with this script's arguments (`mlp` or `conv` for one part; default both).
# Note: the PyPI Linux torch wheel pulls ~3 GB of CUDA runtime wheels even for
# CPU use (about 3 minutes on a fast link); nothing here needs a GPU.
set -euo pipefail
VENV="${TORCH_VENV:-/tmp/torchenv}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, numpy, safetensors' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install torch numpy safetensors
fi
cd "$ROOT"
exec nice "$VENV/bin/python" scripts/torch-fixture.py "$@"

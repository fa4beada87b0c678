#!/usr/bin/env bash
# Install gvpo-offline into the current Python environment.
#   bash scripts/install.sh          # the tool (with matplotlib for `gvpo-offline plot`)
#   bash scripts/install.sh --test   # the tool and its test dependencies
# On a machine without an NVIDIA GPU, the CPU build of PyTorch is installed first, so that resolving
# `torch>=2.4` does not pull a multi-GB CUDA build. With a GPU (or torch already installed) your
# existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra="[plot]"  # matplotlib, so that the quick start ends with its figures
[ "${1:-}" = "--test" ] && extra="[plot,test]"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found; pip will resolve torch>=2.4 (a CUDA build)"
  else
    echo "install: no GPU found; installing the CPU build of PyTorch first"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".${extra}"
echo "install: $("$PYTHON" -c 'import torch, gvpo_offline; print(f"gvpo-offline {gvpo_offline.__version__}, torch {torch.__version__}")')"

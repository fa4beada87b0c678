#!/usr/bin/env bash
# GPU acceptance: the first thing to run on a machine with a CUDA GPU. bf16 precompute-ref and train
# (full, LoRA, packed and padded; QLoRA when bitsandbytes is installed) on a 0.8B Llama-shaped model built
# from a config; prints one table (see benchmarks/gpu_acceptance.py). Stopped after 8 minutes.
# Without a CUDA GPU: one line on stderr, exit code 1.
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--groups 48] [--k 4] [--steps 5] [--peak-tflops auto]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"
status=0
timeout --foreground 480 "$python" "$root/benchmarks/gpu_acceptance.py" "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_acceptance: did not finish in 8 minutes (the target); rerun with fewer --groups or --steps to see the table" >&2
fi
exit "$status"

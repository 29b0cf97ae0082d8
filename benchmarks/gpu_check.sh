#!/usr/bin/env bash
# Device check of the GPU stages: one short run (a few minutes) on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# Uses the machine's python3 (with CUDA PyTorch). Packages it lacks can travel as wheels in .whl/
# (see the device notes in benchmarks/README.md); they are installed into /tmp/site first.
# Prints one JSON document: backbone scans/s (bf16, batches 1/8/16), bf16-vs-fp32 cosine on the GPU,
# lungmask's U-Net seconds for 300 slices, and an `emphy extract` run with GPU workers
# (per-stage seconds, where each stage ran, GPU utilisation).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 LCA_WEIGHTS_DIR=${LCA_WEIGHTS_DIR:-/tmp/lca}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_check.py "$OUT/check" --patients "${PATIENTS:-6}" | tee "$OUT/gpu_check.json"

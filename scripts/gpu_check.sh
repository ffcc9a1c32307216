#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network): build for the local GPU with all
# cores, run the CUDA tests, compute-sanitizer memcheck on a small case, a parity table.
# Output goes to stdout and, where $OUT is set, to $OUT/gpu_check.log. Budget: < 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== build in place (sm_90, all cores; no pip, no network)"
time (CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="9.0" LSTM_EXT_CUDA=1 MAX_JOBS=$(nproc) \
  python setup.py -q build_ext --inplace) || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== CUDA tests (the kernel and module tests; the Shakespeare app needs packages not there)"
timeout 240 python -m pytest -q -m cuda tests/test_ops.py tests/test_modules.py -p no:cacheprovider

echo "== compute-sanitizer memcheck (small forward + backward, packed, projected)"
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
timeout 120 "$SANITIZER" --tool memcheck --error-exitcode 1 python scripts/gpu_parity.py --small \
  && echo "memcheck: clean"

echo "== parity table (CUDA vs CPU float64)"
timeout 120 python scripts/gpu_parity.py

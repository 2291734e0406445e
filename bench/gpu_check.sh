#!/usr/bin/env bash
# The GPU check, run as one call on a lent GPU machine (no network; its own
# python3 with torch + triton + pytest), in under 6 minutes:
#
#   bash bench/gpu_check.sh OUTDIR        # on the device machine: OUTDIR=$OUT
#
# 1. builds fastgan._C with the CUDA kernels for the GPU's architecture (from
#    FASTGAN_CUDA_ARCHS, default 9.0; never queried at build time),
# 2. runs every GPU-marked test (each backend vs the reference on the GPU, CUDA
#    graph capture/replay, the engine, fuse, distributed) and the CPU suite's
#    op tests once more against the freshly built extension,
# 3. runs compute-sanitizer memcheck over a small GPU test selection,
# 4. benchmarks the ops (cuda vs triton vs eager vs torch.compile) and the whole
#    train step (`fastgan bench`), and
# 5. writes gpu_check.log, junit XML and JSON results into OUTDIR.
# Each stage has its own time limit, so one hang cannot eat the whole lease.
set -uo pipefail
OUTDIR="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 FASTGAN_CUDA_ARCHS="${FASTGAN_CUDA_ARCHS:-9.0}"
PY=${PYTHON:-python3}
status=0
stage() {  # stage NAME SECONDS CMD...: run with a time limit, record failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@"; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || status=1
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

# Build in place and make kernels/ importable as fastgan.kernels (editable install, no deps, no index).
stage build 150 env FASTGAN_BUILD_CUDA=1 MAX_JOBS=16 $PY -m pip install -q --no-deps --no-index \
  --no-build-isolation -e .
$PY -c "import fastgan; print('backends:', fastgan.backends()); print('unavailable:', fastgan.unavailable())"

stage gpu-tests 120 $PY -m pytest -m gpu -q --timeout 60 --junitxml="$OUTDIR/gpu_tests.xml" tests
stage memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest -q -m gpu tests/impl/test_cuda_backend.py -k "graph_replay or dropout_mask" --timeout 50
stage bench-cuda-ops 60 $PY bench/bench_ops.py --backend cuda "$OUTDIR/cuda_ops.json" --samples 7 \
  --iters 10 --dtype bf16
stage bench-triton-ops 45 $PY bench/bench_ops.py --backend triton "$OUTDIR/triton_ops.json" --samples 7 \
  --iters 10 --dtype bf16
stage bench-step 75 $PY -m fastgan bench --device cuda --no-ops --batch-sizes 64,1024,16384 \
  --dtypes bf16 --tf32 --contenders eager,compile-reduce-overhead,fastgan,graph \
  --iters 20 --warmup 5 --min-time 0.2 --no-plot --out "$OUTDIR/step"
stage train-graph 60 $PY -m fastgan train --device cuda --data synthetic --steps 600 \
  --steps-per-graph 6 --no-progress --out "$OUTDIR/train_graph"
ls -la "$OUTDIR"
echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status

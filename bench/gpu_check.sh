#!/usr/bin/env bash
# The GPU check, one call on a lent GPU machine (no network; its own python3
# with torch + triton + pytest), in under 6 minutes, most important first:
#
#   bash bench/gpu_check.sh OUTDIR            # on the device machine: OUTDIR=$OUT
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh OUTDIR   # CI: every command on the CPU, tiny sizes
#
#   1 build       fastgan._C with the CUDA kernels (FASTGAN_CUDA_ARCHS, default 9.0)
#   2 smoke       each op x backend (through G, D and the losses) vs the reference,
#                 forward and backward; one captured GAN step vs the eager step
#   3 gpu-tests   the GPU-marked tests, graph tests first (junit XML kept: SIGINT)
#   4 memcheck    compute-sanitizer on the smoke (a refused device is reported, skipped)
#   5 bench-step  the train step at B=64/1024/16384: eager, compile-reduce-overhead,
#                 fastgan eager, fastgan graphed (K=1), then graphed K=1 vs K=8
#   6 bench-ops   bench/bench_ops.py per op and backend (one JSON each)
#   7 train-graph `fastgan train` graphed, 8 steps per graph
#
# Each stage has a time limit, capped by what is left of the 350 s budget, and
# writes into OUTDIR as it goes; a stage that times out gets SIGINT first (pytest
# then still writes its junit XML). summary.tsv / the table at the end list every
# stage. Like with like: fp32 GEMMs are IEEE in every contender (no --tf32; under
# the tf32 label Triton's fp32 GEMMs take TF32 too, as cuBLAS: kernels/runtime.py
# tf32), bf16 is bf16 everywhere.
set -uo pipefail
OUTDIR="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 FASTGAN_CUDA_ARCHS="${FASTGAN_CUDA_ARCHS:-9.0}"
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-350}
# stage limits are sized for the GPU machine; a CPU dry run gets more time per stage
SCALE=${GPU_CHECK_LIMIT_SCALE:-$([ "$DRY" = 1 ] && echo 4 || echo 1)}
T0=$(date +%s)
status=0
printf "stage\trc\tseconds\tlimit\tresult\n" > "$OUTDIR/summary.tsv"

stage() {  # stage NAME SECONDS CMD...: run under a time limit, record the outcome
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    echo "== $name: skipped (budget spent)"
    printf "%s\t-\t0\t0\tskipped: no time left\n" "$name" >> "$OUTDIR/summary.tsv"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  # SIGINT first (pytest writes its report), SIGKILL 10 s later
  timeout -s INT -k 10 "$limit" "$@"; local rc=$?
  local dt=$(( $(date +%s) - t0 )) result=ok
  if [ -f "$OUTDIR/.skip_$name" ]; then result="skipped: $(cat "$OUTDIR/.skip_$name")"; rc=0
  elif [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then result="TIMEOUT"; status=1
  elif [ $rc -ne 0 ]; then result="FAILED"; status=1; fi
  echo "== $name: rc=$rc in ${dt}s ($result)"
  printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$rc" "$dt" "$limit" "$result" >> "$OUTDIR/summary.tsv"
  return 0
}

if [ "$DRY" = 1 ]; then
  DEV=cpu; BACKENDS=cpu; BS=16; BIG="16"; DT=fp32; CONT=eager,fastgan
  ITERS="--iters 1 --warmup 1 --min-time 0"
else
  ITERS="--iters 10 --warmup 3 --min-time 0.1"
  DEV=cuda; BACKENDS=cuda,triton; BS=64,1024,16384; BIG="64 1024 16384"; DT=bf16
  CONT=eager,compile-reduce-overhead,fastgan,graph
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# 1. Build in place; kernels/ importable as fastgan.kernels (editable, no deps, no index).
if [ "$DRY" = 1 ]; then
  stage build 60 $PY -c "import fastgan; print('installed:', fastgan.__file__)"
else
  stage build 90 env FASTGAN_BUILD_CUDA=1 MAX_JOBS=16 $PY -m pip install -q --no-deps --no-index \
    --no-build-isolation -e .
fi
$PY -c "import fastgan; print('backends:', fastgan.backends()); print('unavailable:', fastgan.unavailable())"

# 2. Smoke: G, D (every fused op) and the losses per backend vs the reference on
# the same device, forward and backward; one graphed step vs the eager step.
SMOKE='
import json, sys, torch, fastgan
from fastgan.nn.models import Generator, Discriminator
from fastgan.ops import functional as FG
from fastgan.train import GANStep, ResidentBatches, make_adam
dev, names, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
rows = []
def save():
    json.dump(rows, open(out, "w"), indent=1)
def run(name, dt, b, training):
    torch.manual_seed(0)
    G = Generator(16, (32, 64), 24, dropout=0.0).to(dev, dt).train(training)
    D = Discriminator(24, (48, 16), dropout=0.0).to(dev, dt).train(training)
    z = torch.randn(b, 16, device=dev, dtype=dt)
    real = torch.rand(b, 24, device=dev, dtype=dt)
    with fastgan.use_backend(name):
        fake = G(z)
        logits = D(torch.cat([real, fake]))
        d = FG.gan_bce_d(logits[:b], logits[b:])
        d.loss.backward()
    grads = [p.grad.float() for p in (*G.parameters(), *D.parameters())]
    return [fake.float(), logits.float(), d.loss.float()] + grads
ok = True
for name in names:
    for dt in (torch.float32, torch.bfloat16):
        for b in (8, 65):  # BN over 2-3 rows is too ill-conditioned for a fixed tolerance
            for training in (True, False):
                got, ref = run(name, dt, b, training), run("reference", dt, b, training)
                gold = run("reference", torch.float64, b, training)
                def rel(xs):
                    return max(((x - g.float()).abs().max() / g.float().abs().max()
                                .clamp_min(1e-6)).item() for x, g in zip(xs, gold))
                # as the test suite judges: within twice the error of the reference vs fp64
                err, ref_err = rel(got), rel(ref)
                floor = 1e-5 if dt == torch.float32 else 1e-2
                good = err <= 2 * ref_err + floor
                rows.append(dict(backend=name, dtype=str(dt), batch=b, training=training,
                                 rel_err=err, reference_rel_err=ref_err, ok=good))
                ok &= good
                print(rows[-1], flush=True)
                save()
if dev == "cuda":
    def step(graphs):
        torch.manual_seed(1)
        G, D = Generator(16, (32, 64), 24).to(dev), Discriminator(24, (48, 16)).to(dev)
        data = torch.rand(256, 24, device=dev) * 2 - 1
        s = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()), batch_size=32,
                    latent_dim=16, batches=ResidentBatches(data, 32, seed=2), seed=3,
                    graphs=graphs)
        s.batches.start_epoch(0)
        return [torch.stack(s()).clone() for _ in range(4)]
    g, e = step(True), step(False)
    err = max((a - b).abs().max().item() for a, b in zip(g, e))
    rows.append(dict(check="graphed step vs eager, 4 steps", max_abs_diff=err, ok=err < 1e-4))
    ok &= err < 1e-4
    print(rows[-1], flush=True)
    save()
sys.exit(0 if ok else 1)
'
stage smoke 50 env FASTGAN_TRITON_AUTOTUNE=0 $PY -c "$SMOKE" "$DEV" "$BACKENDS" "$OUTDIR/smoke.json"

# 3. The GPU tests: graph tests first (they were never reached before), then the
# rest; autotune off (one config per kernel: cold compiles, no benchmarking).
PYT="$PY -m pytest -q -p no:cacheprovider --timeout 30"
[ "$DRY" = 1 ] && PYT="$PY -m pytest -q -p no:cacheprovider --collect-only"
stage gpu-tests-graph 40 env FASTGAN_TRITON_AUTOTUNE=0 $PYT -m gpu -k "graph or capture" \
  --junitxml="$OUTDIR/gpu_tests_graph.xml" tests
stage gpu-tests 80 env FASTGAN_TRITON_AUTOTUNE=0 $PYT -m gpu -k "not graph and not capture" \
  --junitxml="$OUTDIR/gpu_tests.xml" tests

# 4. memcheck on the smoke (cuda backend only, autotune off); a sanitizer that
# refuses the device or is missing is reported and skipped, not failed.
MEMCHECK='
out=$1; shift
command -v compute-sanitizer > /dev/null || { echo "compute-sanitizer not found" > "$out/.skip_memcheck"; exit 0; }
compute-sanitizer --tool memcheck --error-exitcode 9 "$@" > "$out/memcheck.log" 2>&1; rc=$?
tail -n 20 "$out/memcheck.log"
if grep -q "ERROR SUMMARY: 0 errors" "$out/memcheck.log"; then exit 0; fi
if grep -qE "ERROR SUMMARY: [1-9]" "$out/memcheck.log"; then exit 9; fi
if grep -qiE "not supported|unable to|device.*(not|un)available|target application" "$out/memcheck.log"; then
  echo "compute-sanitizer refused the device (see memcheck.log)" > "$out/.skip_memcheck"; exit 0; fi
exit $rc
'
stage memcheck 30 env FASTGAN_TRITON_AUTOTUNE=0 bash -c "$MEMCHECK" memcheck "$OUTDIR" \
  $PY -c "$SMOKE" "$DEV" "${BACKENDS%%,*}" "$OUTDIR/memcheck_smoke.json"

# 5. The whole train step (the one benchmark of fastgan bench), then graphed K=1 vs K=8.
stage bench-step 60 $PY -m fastgan bench --device $DEV --no-ops --batch-sizes $BS --dtypes $DT \
  --contenders $CONT $ITERS --no-plot --out "$OUTDIR/step"
KSTEPS='
import json, os, sys, torch
from fastgan.nn.models import Generator, Discriminator
from fastgan.tools.benchmark.timing import measure_many
from fastgan.train import GANStep, ResidentBatches, make_adam
dev, out, sizes = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]]
dt = torch.bfloat16 if dev == "cuda" else torch.float32
rows = []
for b in sizes:
    fns = {}
    for k in (1, 8):
        G, D = Generator().to(dev, dt), Discriminator().to(dev, dt)
        data = torch.rand(b * 8, 784, device=dev, dtype=dt) * 2 - 1
        s = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()), batch_size=b,
                    latent_dim=100, batches=ResidentBatches(data, b, seed=1), steps_per_call=k,
                    graphs=dev == "cuda")
        s.batches.start_epoch(0)
        fns[k] = s
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    t = measure_many(fns, torch.device(dev), warmup=1 if dry else 2, iters=1 if dry else 5,
                     min_time_s=0.0 if dry else 0.2)
    for k in fns:
        rows.append(dict(batch=b, dtype=str(dt), k=k, us_per_step=t[k].median_ms * 1e3 / k))
        print(rows[-1], flush=True)
    json.dump(rows, open(out, "w"), indent=1)
'
stage bench-graph-k 30 $PY -c "$KSTEPS" $DEV "$OUTDIR/graph_k.json" $BIG

# 6. Op benchmarks, one run per backend and op, so each writes its JSON as it ends.
for be in cuda triton; do
  for op in linear_bn_act linear_act gan_bce; do
    if [ "$DRY" = 1 ]; then
      stage "ops-$be-$op" 20 $PY bench/bench_ops.py --backend $be "$OUTDIR/ops_${be}_$op.json" \
        --ops $op --dtype bf16 --dry-run
    else
      stage "ops-$be-$op" 12 $PY bench/bench_ops.py --backend $be "$OUTDIR/ops_${be}_$op.json" \
        --ops $op --dtype bf16 --samples 5 --iters 10
    fi
  done
done

# 7. The CLI, graphed, K=8 (divides the 64 steps of an epoch of 4096 synthetic images at batch 64).
if [ "$DRY" = 1 ]; then
  stage train-graph 60 $PY -m fastgan train --device cpu --data synthetic --steps 16 \
    --batch-size 64 --no-graphs --no-progress --out "$OUTDIR/train_graph"
else
  stage train-graph 25 $PY -m fastgan train --device cuda --data synthetic --steps 128 \
    --batch-size 64 --steps-per-graph 8 --no-progress --out "$OUTDIR/train_graph"
fi

rm -f "$OUTDIR"/.skip_*
ls -la "$OUTDIR"
echo "== summary (total $(( $(date +%s) - T0 )) s of a ${BUDGET} s budget)"
column -t -s $'\t' "$OUTDIR/summary.tsv" 2>/dev/null || cat "$OUTDIR/summary.tsv"
echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status

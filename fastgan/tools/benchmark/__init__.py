"""Throughput benchmarks: the seed GAN's whole train step and each fused op,
every contender side by side in one process.

This is a library: it runs contenders and returns plain-dict records (see
``RECORD_FIELDS``); the CLI (``fastgan.cli.bench``) prints, plots and saves them.
Its parts, one job each: ``timing`` (the timer, also used by
bench/bench_ops.py), ``contenders`` (who competes and under which settings),
``workloads`` (the train step and op callables, their FLOPs), ``records``
(records, the result document, machine info) and ``runner`` (``Config``,
``run``, ``profile_step``).

Contenders
----------
``eager``                    the plain-PyTorch reference (``fused=False`` models, nn layers),
                             ``torch.optim.Adam`` with its defaults, as most users write it
``eager-fused-adam``         the same with ``torch.optim.Adam(fused=True)``: a careful user
                             (train step only: an op benchmark has no optimizer)
``eager-bf16``               the same as ``eager`` under ``torch.autocast(<device>, bfloat16)``
                             (fp32 weights): always bf16, whatever the run's dtypes
``compile[-<mode>]``         the reference under ``torch.compile`` (default mode; on a
                             GPU also ``reduce-overhead`` and ``max-autotune``)
``fastgan-<backend>``        the fused models, eager, one contender per available backend
``fastgan-<backend>-graph``  the fused train step captured in a CUDA graph (GPU only)

Families for ``contenders(names=...)``: ``eager-all`` (the three eager ones),
``compile``, ``fastgan``, ``graph``; ``eager`` names only the plain reference.

Dtypes: each dtype label runs every contender in it. bf16 (fp16) is autocast
for the eager and compiled reference, and fastgan's bf16 training mode for
fastgan (bf16 weights, fp32 master weights, BN in fp32, no autocast):
each as its users would run it. The record's ``precision`` says which.
``eager`` at bf16 is the same computation as ``eager-bf16`` and is timed once,
under that name. Every (contender, dtype) of one batch is one round-robin
group, so the cross-dtype ratio is measured side by side.

Ratios: ``speedup_vs_eager`` over the eager reference *in the row's dtype*
(``eager``; ``eager-bf16`` for bf16 rows), ``speedup_vs_eager_fp32`` over
``eager`` in fp32 at the same batch (the one to read for "bf16 vs eager
fp32"), ``speedup_vs_compile`` over the fastest torch.compile mode in the
row's dtype.

GEMM peak: before timing, the run measures this machine's GEMM GFLOP/s on a
4096³ GEMM in fp32 and bf16 (and any other dtype of the run): oneDNN's
``mkldnn._linear_pointwise`` on the CPU (fp32 in IEEE precision), ``torch.mm``
on a GPU; the best of a few calls, once per process (``peak.gemm_peak``). Each
record gives ``gemm_gflops`` (its GEMM FLOPs / median time), ``peak_gflops``
(the peak of its dtype) and ``peak_frac``; the document's ``peaks`` has them
all.

Timing: the first call (which includes any compilation) and the rest of the
warm-up are timed separately from the measured steps. Then the contenders of
one (workload, batch, dtype) are sampled round-robin, one sample each per
round, so a change in the machine's load hits all of them alike. A sample is
one call on the CPU, and ``repeat`` calls between two CUDA events on a GPU (so
the timer's own launch latency is not counted). Reported: median and
20th/80th percentile per call. Peak memory is measured on a GPU only
(``torch.cuda.max_memory_allocated`` over the warm-up, above what was allocated
before); on the CPU it is left empty.

FLOPs are those of the GEMMs only: ``2*B*K*N`` per Linear per forward pass, three
times that when the pass is also differentiated (dX and dW). By default one train
step counts G forward+backward once, D forward+backward three times (real and
fake for the D loss, fake again for the G loss): a nominal count, the same for
every contender, so TFLOP/s stay comparable. It overstates the work a little
(D's first layer needs no dX on the D step). With schedules named
(``fastgan bench --schedule alternating,simultaneous``) each schedule's step
counts the GEMMs it needs (``step_flops(..., schedule=)``): for the seed GAN at
batch 64, 1.854 GFLOP alternating and 1.668 GFLOP simultaneous.
"""
from .contenders import FAMILIES, Contender, contenders, eager_baseline, precision, runs
from .peak import PEAK_N, gemm_peak, gemm_peaks
from .records import (RECORD_FIELDS, SCHEMA, add_peaks, add_speedups, cpu_model, machine_info,
                      result, validate)
from .runner import CPU_BATCHES, DTYPES, GPU_BATCHES, Config, peaks, profile_step, run
from .timing import Timing, measure, measure_many, sample, warm
from .workloads import (OP_SHAPES, OPS, PASSES, build_op, build_step, first_layer_flops,
                        forward_flops, linear_shapes, op_flops, op_plain_reason, step_flops)

__all__ = [
    "CPU_BATCHES", "DTYPES", "FAMILIES", "GPU_BATCHES", "OP_SHAPES", "OPS", "PASSES", "PEAK_N",
    "RECORD_FIELDS", "SCHEMA", "Config", "Contender", "Timing", "add_peaks", "add_speedups",
    "build_op", "build_step", "contenders", "cpu_model", "eager_baseline", "first_layer_flops",
    "forward_flops", "gemm_peak", "gemm_peaks", "linear_shapes", "machine_info", "measure",
    "measure_many", "op_flops", "op_plain_reason", "peaks", "precision", "profile_step",
    "result", "run", "runs", "sample", "step_flops", "validate", "warm",
]

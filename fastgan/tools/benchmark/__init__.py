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
``eager``                    the plain-PyTorch reference (``fused=False`` models, nn layers)
``compile[-<mode>]``         the same reference under ``torch.compile`` (default mode; on a
                             GPU also ``reduce-overhead`` and ``max-autotune``)
``fastgan-<backend>``        the fused models, eager, one contender per available backend
``fastgan-<backend>-graph``  the fused train step captured in a CUDA graph (GPU only)

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
from .contenders import Contender, contenders, precision
from .records import RECORD_FIELDS, SCHEMA, add_speedups, cpu_model, machine_info, result, validate
from .runner import CPU_BATCHES, DTYPES, GPU_BATCHES, Config, profile_step, run
from .timing import Timing, measure, measure_many, sample, warm
from .workloads import (OP_SHAPES, OPS, PASSES, build_op, build_step, first_layer_flops,
                        forward_flops, linear_shapes, op_flops, step_flops)

__all__ = [
    "CPU_BATCHES", "DTYPES", "GPU_BATCHES", "OP_SHAPES", "OPS", "PASSES", "RECORD_FIELDS",
    "SCHEMA", "Config", "Contender", "Timing", "add_speedups", "build_op", "build_step",
    "contenders", "cpu_model", "first_layer_flops", "forward_flops", "linear_shapes",
    "machine_info", "measure", "measure_many", "op_flops", "precision", "profile_step", "result",
    "run", "sample", "step_flops", "validate", "warm",
]

"""Throughput benchmarks: the seed GAN's whole train step and each fused op,
every contender side by side in one process.

This is a library: it runs contenders and returns plain-dict records (see
``RECORD_FIELDS``); the CLI (``fastgan.cli.bench``) prints, plots and saves them.

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
times that when the pass is also differentiated (dX and dW). One train step
counts, per the design's step: G forward+backward once, D forward+backward three
times (real and fake for the D loss, fake again for the G loss). That nominal
count slightly overstates the work (D's first layer needs no dX on the D
step), and is the same for every contender, so TFLOP/s stay comparable.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.models import Discriminator, Generator
from ..ops import dispatch as _backend
from ..ops import functional as FG
from ..nn.layers import linear_act_sequential, linear_bn_act_sequential, LinearAct, LinearBNAct

SCHEMA = "fastgan-bench/1"
GPU_BATCHES = (32, 64, 256, 1024, 4096, 16384)
CPU_BATCHES = (32, 64, 256)
DTYPES = ("fp32", "bf16")          # "tf32" is an opt-in label: fp32 with TF32 matmuls
PASSES = ("forward", "backward", "both")
OPS = ("linear_bn_act", "linear_act", "gan_bce")

# One record = one (contender, what, batch, dtype) measurement.
RECORD_FIELDS = (
    "kind", "op", "pass", "contender", "backend", "batch", "dtype", "median_ms", "p20_ms",
    "p80_ms", "images_per_s", "speedup_vs_eager", "speedup_vs_compile", "tflops",
    "peak_mem_mb", "first_call_s", "warmup_s", "iters", "gflop", "note",
)


# ---------------------------------------------------------------------------- machine
def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: recorded with every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this platform
        triton_version = None
    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "backends": dict(_backend.backends()),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


# ---------------------------------------------------------------------------- FLOPs
def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear of ``model``, in order."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def forward_flops(model: nn.Module, batch: int) -> int:
    return sum(2 * batch * k * n for k, n in linear_shapes(model))


def step_flops(G: nn.Module, D: nn.Module, batch: int) -> int:
    """GEMM FLOPs of one GAN train step (see the module docstring)."""
    return 3 * forward_flops(G, batch) + 3 * 3 * forward_flops(D, batch)


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    samples_ms: list = field(default_factory=list)
    first_call_s: float = 0.0
    warmup_s: float = 0.0
    peak_mem_mb: Optional[float] = None

    def percentile(self, q: float) -> float:
        xs = sorted(self.samples_ms)
        if len(xs) == 1:
            return xs[0]
        pos = q / 100 * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Timing:
    """First call (compilation, capture, lazy init) and warm-up, timed apart."""
    t = Timing()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    t.first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    t.warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        # peak of the warm-up calls: what one contender needs (later samples
        # interleave contenders, so their peak would mix them)
        t.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return t


def sample(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Milliseconds per call: one call on the CPU, ``repeat`` calls between two
    CUDA events on a GPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeat):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / repeat
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_many(fns: dict, device: torch.device, warmup: int = 3, iters: int = 20,
                 min_time_s: float = 0.0, repeat: int = 1) -> dict:
    """Time several callables side by side: each is warmed up, then samples are
    taken round-robin (one per callable per round) until each has ``iters`` and
    ``min_time_s`` per callable has passed. Interleaving keeps the ratios fair
    when the machine's load drifts (a shared CPU). Returns {key: Timing}."""
    timings = {k: (warm(fn, device, warmup) if warmup else Timing()) for k, fn in fns.items()}
    if not fns:
        return timings
    start = time.perf_counter()
    rounds = 0
    while rounds < iters or time.perf_counter() - start < min_time_s * len(fns):
        for k, fn in fns.items():
            timings[k].samples_ms.append(sample(fn, device, repeat))
        rounds += 1
        if rounds >= 50 * max(iters, 1):
            break
    return timings


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20,
            min_time_s: float = 0.0, repeat: int = 1) -> Timing:
    """Time ``fn`` alone (see ``measure_many``)."""
    return measure_many({0: fn}, device, warmup, iters, min_time_s, repeat)[0]


# ---------------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    name: str
    fused: bool                      # fastgan layers (True) or the nn reference (False)
    backend: Optional[str] = None    # forced fastgan backend
    compile_mode: Optional[str] = None  # None: eager; "default", "reduce-overhead", ...
    cuda_graph: bool = False


def contenders(device: torch.device, names: Optional[Iterable[str]] = None) -> list[Contender]:
    """Every contender that can run on ``device`` (filtered by ``names`` if given).

    ``names`` may use the family names ``eager``, ``compile``, ``fastgan``
    (every backend) and ``graph`` as well as exact contender names.
    """
    out = [Contender("eager", fused=False)]
    modes = ["default"] + (["reduce-overhead", "max-autotune"] if device.type == "cuda" else [])
    for m in modes:
        out.append(Contender("compile" if m == "default" else f"compile-{m}", fused=False,
                             compile_mode=m))
    for b in _backend.backends():
        mod = _backend._load(b)[0]
        if mod is not None and mod.supports(device):
            out.append(Contender(f"fastgan-{b}", fused=True, backend=b))
            if device.type == "cuda" and b != "reference":
                out.append(Contender(f"fastgan-{b}-graph", fused=True, backend=b, cuda_graph=True))
    # Triton on CPU tensors is the interpreter: a correctness tool, far too slow
    # to time. It runs only when named exactly.
    interp = {"fastgan-triton"} if device.type == "cpu" else set()
    if names is None:
        return [c for c in out if c.name not in interp]
    wanted = set(names)
    unknown = wanted - {c.name for c in out} - {"eager", "compile", "fastgan", "graph"}
    if unknown:
        raise ValueError(f"contenders: unknown or unavailable here: {sorted(unknown)}; "
                         f"available: {[c.name for c in out]}")

    def keep(c: Contender) -> bool:
        return (c.name in wanted or ("compile" in wanted and c.compile_mode is not None)
                or ("fastgan" in wanted and c.fused and not c.cuda_graph
                    and c.name not in interp)
                or ("graph" in wanted and c.cuda_graph))
    return [c for c in out if keep(c)]


@contextlib.contextmanager
def precision(dtype: str, device: torch.device):
    """Autocast / TF32 settings of one dtype label."""
    if dtype not in ("fp32", "bf16", "fp16", "tf32"):
        raise ValueError(f"dtype must be fp32, bf16, fp16 or tf32, got {dtype!r}")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
        if dtype in ("bf16", "fp16"):
            dt = torch.bfloat16 if dtype == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dt):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(prev)


@contextlib.contextmanager
def _backend_ctx(c: Contender):
    # The environment variable rather than ``use_backend``: that one is
    # thread-local, and autograd runs CUDA backward passes on its own threads.
    if not c.backend:
        yield
        return
    prev = os.environ.get("FASTGAN_BACKEND")
    os.environ["FASTGAN_BACKEND"] = c.backend
    try:
        yield
    finally:
        if prev is None:
            del os.environ["FASTGAN_BACKEND"]
        else:
            os.environ["FASTGAN_BACKEND"] = prev


def _compile(module: nn.Module, c: Contender):
    if c.compile_mode is None:
        return module
    mode = None if c.compile_mode == "default" else c.compile_mode
    # A fresh start and static shapes for every (contender, batch, dtype): the
    # models share forward code objects, so otherwise a second batch size would
    # get a dynamic-shape recompile, and many would hit the recompile limit and
    # silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(module, mode=mode, dynamic=False)


def _ref_loss_d(real_logits, fake_logits):
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def _fused_loss_d(real_logits, fake_logits):
    return FG.gan_bce_d(real_logits, fake_logits).loss


def build_step(c: Contender, batch: int, device: torch.device, dtype: str = "fp32",
               seed: int = 0, latent_dim: int = 100):
    """A zero-argument callable running one whole GAN train step for contender ``c``.

    The step is the training engine's (``fastgan.train``): ``ReferenceStep`` for
    the eager and compiled reference, ``GANStep`` for fastgan (CUDA graph on or
    off). The real batch is a fixed tensor on ``device`` (no data loading is
    timed); noise is drawn on the device inside the step.
    Returns ``(step, G, D)``.
    """
    from ..train import GANStep, ReferenceStep, make_adam

    torch.manual_seed(seed)
    G = Generator(latent_dim=latent_dim, fused=c.fused).to(device).train()
    D = Discriminator(fused=c.fused).to(device).train()
    if c.compile_mode is None and not c.fused:
        # The eager reference: Adam as a user writes it (what Trainer uses too).
        opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    else:
        # torch.compile gets the engine's fused Adam as well, so the comparison
        # is about the layers and the step, not about an optimizer flag.
        opt_g, opt_d = make_adam(G.parameters(), device=device), make_adam(D.parameters(), device=device)
    kw = dict(batch_size=batch, latent_dim=latent_dim, seed=seed, device=device)
    if c.fused:
        engine = GANStep(G, D, opt_g, opt_d, graphs=c.cuda_graph, **kw)
    else:
        engine = ReferenceStep(_compile(G, c), _compile(D, c), opt_g, opt_d, **kw)
    real = torch.rand(batch, 784, device=device) * 2 - 1

    # torch.compile's CUDA-graph modes need to be told where a step begins.
    mark = (c.compile_mode in ("reduce-overhead", "max-autotune") and device.type == "cuda")

    def step():
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        with _backend_ctx(c), precision(dtype, device):
            return engine(real)

    return step, G, D


# ---------------------------------------------------------------------------- ops
# The layer each op is measured on: the generator's widest BN block and the
# discriminator's first block, with the seed's dropout and slope.
OP_SHAPES = {"linear_bn_act": (512, 1024), "linear_act": (784, 1024), "gan_bce": (1, 1)}


def _op_module(op: str, c: Contender, device: torch.device) -> nn.Module:
    k, n = OP_SHAPES[op]
    if op == "linear_bn_act":
        m = LinearBNAct(k, n, dropout=0.2) if c.fused else linear_bn_act_sequential(k, n, dropout=0.2)
    elif op == "linear_act":
        m = LinearAct(k, n, dropout=0.2) if c.fused else linear_act_sequential(k, n, dropout=0.2)
    else:
        m = _GanBCE(c.fused)
    return m.to(device).train()


class _GanBCE(nn.Module):
    """The D loss (real and fake logits -> loss): fused op or two BCE-with-logits."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused

    def forward(self, logits):
        real, fake = logits.chunk(2, dim=0)
        return _fused_loss_d(real, fake) if self.fused else _ref_loss_d(real, fake)


def build_op(c: Contender, op: str, pass_: str, batch: int, device: torch.device,
             dtype: str = "fp32", seed: int = 0):
    """A zero-argument callable running ``pass_`` of ``op`` once for contender ``c``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if c.cuda_graph:
        raise ValueError("op benchmarks have no CUDA-graph contender")
    torch.manual_seed(seed)
    m = _compile(_op_module(op, c, device), c)
    k = OP_SHAPES[op][0]
    rows = 2 * batch if op == "gan_bce" else batch
    # x needs a gradient: inside a network every layer computes dX as well.
    x = torch.randn(rows, k, device=device, requires_grad=True)
    params = [x] + list(m.parameters())

    def forward():
        with _backend_ctx(c), precision(dtype, device):
            return m(x)

    if pass_ == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run
    if pass_ == "both":
        def run():
            y = forward()
            with _backend_ctx(c):
                return torch.autograd.grad(y, params, torch.ones_like(y))
        return run
    # backward alone: one forward graph, differentiated again and again
    y = forward()
    gy = torch.ones_like(y)

    def run():
        with _backend_ctx(c):
            return torch.autograd.grad(y, params, gy, retain_graph=True)
    return run


def op_flops(op: str, pass_: str, batch: int) -> int:
    if op == "gan_bce":
        return 0
    k, n = OP_SHAPES[op]
    f = 2 * batch * k * n
    return {"forward": f, "backward": 2 * f, "both": 3 * f}[pass_]


# ---------------------------------------------------------------------------- driver
_SEED_GAN: list = []


def _seed_gan():
    if not _SEED_GAN:
        _SEED_GAN.extend([Generator(fused=False), Discriminator(fused=False)])
    return _SEED_GAN


def _error(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _backend_calls(name: Optional[str]) -> int:
    return sum(n for (b, _), n in _backend.calls.items() if b == name)


@dataclass
class Config:
    device: torch.device
    batches: tuple = CPU_BATCHES
    dtypes: tuple = ("fp32",)
    contenders: Optional[tuple] = None   # names; None = all available
    steps: bool = True                   # whole train step
    ops: tuple = OPS
    passes: tuple = PASSES
    warmup: int = 3
    iters: int = 20
    min_time_s: float = 0.5
    repeat: int = 1                      # calls per sample on a GPU
    seed: int = 0


def _record(kind, op, pass_, c: Contender, batch, dtype, t: Optional[Timing], flops,
            note="") -> dict:
    r = dict.fromkeys(RECORD_FIELDS)
    r.update(kind=kind, op=op, contender=c.name, backend=c.backend, batch=batch, dtype=dtype,
             note=note, gflop=flops / 1e9)
    r["pass"] = pass_
    if t is not None:
        med = t.median_ms
        r.update(median_ms=med, p20_ms=t.percentile(20), p80_ms=t.percentile(80),
                 images_per_s=batch / (med / 1e3), tflops=(flops / (med / 1e3) / 1e12) or None,
                 peak_mem_mb=t.peak_mem_mb, first_call_s=t.first_call_s, warmup_s=t.warmup_s,
                 iters=len(t.samples_ms))
    return r


def add_speedups(records: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_eager`` and ``speedup_vs_compile`` (vs the fastest
    ``compile*`` contender) within each (kind, op, pass, batch, dtype) group."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["kind"], r["op"], r["pass"], r["batch"], r["dtype"]), []).append(r)
    for rs in groups.values():
        ok = [r for r in rs if r["median_ms"] is not None]
        eager = next((r["median_ms"] for r in ok if r["contender"] == "eager"), None)
        comp = [r["median_ms"] for r in ok if r["contender"].startswith("compile")]
        best = min(comp) if comp else None
        for r in ok:
            r["speedup_vs_eager"] = eager / r["median_ms"] if eager else None
            r["speedup_vs_compile"] = best / r["median_ms"] if best else None
    return records


def run(cfg: Config, on_record: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Run every (contender, workload, batch, dtype) of ``cfg``; returns records.

    A contender that fails (e.g. torch.compile without a C++ compiler) gets a
    record with no timing and the error in ``note`` instead of stopping the run.
    """
    device = cfg.device
    cs = contenders(device, cfg.contenders)
    records = []

    def emit(r):
        records.append(r)
        if on_record is not None:
            on_record(r)

    work = []
    if cfg.steps:
        work.append(("step", "gan_step", "both"))
    work += [("op", op, p) for op in cfg.ops for p in cfg.passes]
    for kind, op, pass_ in work:
        for dtype in cfg.dtypes:
            for batch in cfg.batches:
                group = [c for c in cs if not (kind == "op" and c.cuda_graph)]
                flops = (step_flops(*_seed_gan(), batch) if kind == "step"
                         else op_flops(op, pass_, batch))
                fns, notes, timings = {}, {}, {}
                for c in group:  # build and warm up each; a failure is recorded, not fatal
                    try:
                        if kind == "step":
                            fn = build_step(c, batch, device, dtype, cfg.seed)[0]
                        else:
                            fn = build_op(c, op, pass_, batch, device, dtype, cfg.seed)
                        before = _backend_calls(c.backend)
                        timings[c.name] = warm(fn, device, cfg.warmup)
                        fns[c.name] = fn
                        if (c.backend and _backend_calls(c.backend) == before
                                and (op, pass_) != ("gan_bce", "backward")):
                            notes[c.name] = f"backend {c.backend} never ran"  # the label must be true
                    except Exception as e:
                        notes[c.name] = _error(e)
                try:
                    sampled = measure_many(fns, device, 0, cfg.iters, cfg.min_time_s, cfg.repeat)
                except Exception as e:
                    sampled = {}
                    for name in fns:
                        notes[name] = _error(e)
                group_records = []
                for c in group:
                    t = timings.get(c.name)
                    if c.name in sampled and sampled[c.name].samples_ms:
                        t.samples_ms = sampled[c.name].samples_ms
                    else:
                        t = None
                    group_records.append(_record(kind, op, pass_, c, batch, dtype, t, flops,
                                                 notes.get(c.name, "")))
                add_speedups(group_records)
                for r in group_records:
                    emit(r)
                del fns
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return add_speedups(records)


def result(cfg: Config, records: list[dict], machine: Optional[dict] = None) -> dict:
    """The JSON document of one run."""
    return {
        "schema": SCHEMA,
        "machine": machine if machine is not None else machine_info(cfg.device),
        "config": {"batches": list(cfg.batches), "dtypes": list(cfg.dtypes),
                   "contenders": [c.name for c in contenders(cfg.device, cfg.contenders)],
                   "ops": list(cfg.ops), "passes": list(cfg.passes), "steps": cfg.steps,
                   "warmup": cfg.warmup, "iters": cfg.iters, "min_time_s": cfg.min_time_s,
                   "repeat": cfg.repeat, "seed": cfg.seed,
                   "flop_model": "GEMMs only: 2*B*K*N per Linear forward, x3 with backward; "
                                 "step = 3*G + 9*D forward GEMM FLOPs"},
        "records": records,
    }


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` is not a well-formed result document."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("machine", "config", "records"):
        if key not in doc:
            raise ValueError(f"result document lacks {key!r}")
    for key in ("cpu", "torch", "git_commit", "device"):
        if key not in doc["machine"]:
            raise ValueError(f"machine info lacks {key!r}")
    for i, r in enumerate(doc["records"]):
        missing = set(RECORD_FIELDS) - set(r)
        if missing:
            raise ValueError(f"record {i} lacks {sorted(missing)}")


# ---------------------------------------------------------------------------- profile
def profile_step(c: Contender, batch: int, device: torch.device, dtype: str = "fp32",
                 steps: int = 10, row_limit: int = 25) -> str:
    """A torch.profiler table (self time, top ops) of ``steps`` train steps."""
    step = build_step(c, batch, device, dtype)[0]
    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)

"""``fastgan bench``: the seed GAN's train step and the fused ops, every contender
side by side; a table on the terminal, JSON + CSV + PNG on disk.

    fastgan bench                       # everything available here, default sizes
    fastgan bench --quick               # CI smoke run: tiny sizes, few iterations
    fastgan bench --no-ops --batch-sizes 64,256 --dtypes fp32,bf16 --contenders eager-all,fastgan-cpu
                                        # the honest contenders, fp32 and bf16, side by side
    fastgan bench --no-ops --batch-sizes 64 --profile   # where the step's time goes
    fastgan bench --quality             # time-to-quality: fastgan vs the eager reference
    fastgan bench --schedule alternating,simultaneous --no-ops   # both train-step schedules
    fastgan bench --quality --variants alternating,simultaneous,seed --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import textwrap

import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="throughput benchmarks (train step and fused ops)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated (default: 32,64,256 on CPU; up to 16384 on GPU)")
    p.add_argument("--dtypes", default=None,
                   help="default fp32,bf16 (fp32 with --quick); comma-separated from fp32, "
                        "bf16, fp16, tf32 (fp32 with TF32 matmuls; labelled separately). "
                        "bf16: autocast for eager and compile, fastgan's bf16 training mode "
                        "for fastgan (bf16 weights, fp32 master weights, BN fp32); fp16: "
                        "autocast. eager-bf16 always runs bf16; every row gives its ratio to "
                        "eager in its own dtype (xeager) and to eager fp32 (xfp32)")
    p.add_argument("--tf32", action="store_true", help="add the tf32 dtype label")
    p.add_argument("--contenders", default=None,
                   help="comma-separated names or families; default: all available. Names: "
                        "eager (plain reference, default Adam), eager-fused-adam (the same with "
                        "Adam(fused=True)), eager-bf16 (eager under autocast bf16, fp32 "
                        "weights), compile[-<mode>], fastgan-<backend>[-graph]. Families: "
                        "eager-all (the three eager ones; 'eager' alone is only the plain "
                        "reference), compile, fastgan, graph")
    p.add_argument("--ops", default="linear_bn_act,linear_act,gan_bce",
                   help="fused ops to time one by one (comma-separated, or 'none')")
    p.add_argument("--passes", default=None, help="default forward,backward,both "
                   "(both with --quick)")
    p.add_argument("--no-step", action="store_true", help="skip the whole train step")
    p.add_argument("--schedule", default=None,
                   help="train-step schedules to time side by side, comma-separated from "
                        "alternating, simultaneous (records gan_step:<schedule>, with the "
                        "GEMM FLOPs each needs); default: the engine's default schedule, "
                        "nominal FLOPs")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op benchmarks")
    p.add_argument("--iters", type=int, default=20, help="measured samples (at least)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls, timed separately")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="keep sampling until this many seconds have passed")
    p.add_argument("--repeat", type=int, default=None,
                   help="calls per timed sample on a GPU (default 10; 1 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--peak-size", type=int, default=None,
                   help="N of the N×N×N GEMM whose GFLOP/s is the machine's peak, measured "
                        "in fp32 and bf16 before the contenders (oneDNN on CPU, cuBLAS on GPU; "
                        "default 4096, 1024 with --quick)")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the GEMM peak (no %%peak column)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke mode for CI: batch 16, fp32, pass 'both', 3 samples")
    p.add_argument("--out", default="fastgan-bench",
                   help="output prefix: writes PREFIX.json, PREFIX.csv, PREFIX.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of the eager and fastgan steps "
                        "(first batch size) to PREFIX-profile.txt")
    p.add_argument("--quality", action="store_true",
                   help="time-to-quality instead of throughput (see fastgan.quality)")
    p.add_argument("--fd-threshold", type=float, default=None,
                   help="--quality: Fréchet distance to reach (default: see fastgan.quality)")
    p.add_argument("--max-steps", type=int, default=3000, help="--quality: give up after")
    p.add_argument("--eval-every", type=int, default=250, help="--quality: steps between evals")
    p.add_argument("--quality-batch", type=int, default=64, help="--quality: batch size")
    p.add_argument("--seeds", default="0", help="--quality: comma-separated seeds")
    p.add_argument("--variants", default="eager,fastgan",
                   help="--quality: settings to compare, trained side by side: fastgan "
                        "(defaults), eager (the plain-PyTorch loop), alternating, simultaneous "
                        "(the engine with that schedule), seed (--preset seed); default "
                        "eager,fastgan")
    p.add_argument("--grids", default=None, metavar="DIR",
                   help="--quality: also write each run's final sample grid (64 fixed latent "
                        "vectors) to DIR/<variant>_seed<N>.png")
    p.add_argument("--n-eval", type=int, default=1000,
                   help="--quality: images scored per evaluation (and in the real floor)")
    p.add_argument("--data", default=None, help="--quality: MNIST source (see fastgan eval)")
    p.add_argument("--cache-dir", default=None, help="--quality: classifier cache")
    return p


def _ints(s: str, name: str) -> tuple:
    from . import CLIError

    try:
        out = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{name} must be comma-separated integers, got {s!r}") from None
    if not out or min(out) < 2:
        raise CLIError(f"{name} must be integers >= 2, got {s!r}")
    return out


def _names(s):
    return None if s is None else tuple(v.strip() for v in s.split(",") if v.strip())


def _schedules(text):
    from ..train.config import SCHEDULES
    from . import CLIError
    if text is None:
        return None
    names = _names(text)
    for s in names:
        if s not in SCHEDULES:
            raise CLIError(f"--schedule: unknown schedule {s!r} (have {', '.join(SCHEDULES)})")
    return names


def config_from_args(args):
    from ..tools import benchmark as B
    from . import CLIError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is available")
    gpu = device.type == "cuda"
    batches = _ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else (
        B.GPU_BATCHES if gpu else B.CPU_BATCHES)
    dtypes = _names(args.dtypes or ("fp32" if args.quick else "fp32,bf16"))
    dtypes += ("tf32",) if args.tf32 else ()
    ops = () if args.no_ops or args.ops == "none" else _names(args.ops)
    for o in ops:
        if o not in B.OPS:
            raise CLIError(f"--ops: unknown op {o!r} (have {', '.join(B.OPS)})")
    passes = _names(args.passes or ("both" if args.quick else "forward,backward,both"))
    for q in passes:
        if q not in B.PASSES:
            raise CLIError(f"--passes: unknown pass {q!r} (have {', '.join(B.PASSES)})")
    for d in dtypes:
        if d not in ("fp32", "bf16", "fp16", "tf32"):
            raise CLIError(f"--dtypes: unknown dtype {d!r}")
    cfg = B.Config(device=device, batches=batches, dtypes=dtypes,
                   contenders=_names(args.contenders), steps=not args.no_step, ops=ops,
                   passes=passes, warmup=args.warmup, iters=args.iters,
                   min_time_s=args.min_time, repeat=args.repeat or (10 if gpu else 1),
                   seed=args.seed, schedules=_schedules(args.schedule), peak=not args.no_peak,
                   peak_n=args.peak_size or (1024 if args.quick else B.PEAK_N))
    if args.peak_size is not None and args.peak_size < 1:
        raise CLIError(f"--peak-size must be a positive integer, got {args.peak_size}")
    if args.quick:
        cfg.batches = _ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else (16,)
        cfg.iters, cfg.warmup, cfg.min_time_s, cfg.repeat = 3, 1, 0.0, 1
    try:
        B.contenders(device, cfg.contenders)
    except ValueError as e:
        raise CLIError(f"--{e}") from None
    return cfg


# ------------------------------------------------------------------ output
def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def format_row(r: dict) -> str:
    if r["kind"] == "step":
        what = "train step" + ("" if r["op"] == "gan_step" else f" {r['op'].split(':')[1]}")
    else:
        what = f"{r['op']} {r['pass']}"
    if r["median_ms"] is None:
        return f"{what:<24} {r['dtype']:<5} {r['batch']:>6} {r['contender']:<22} FAILED: {r['note']}"
    spread = f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
    line = (f"{what:<24} {r['dtype']:<5} {r['batch']:>6} {r['contender']:<22} {spread:>28} "
            f"{r['images_per_s']:>10.0f} {_fmt(r['speedup_vs_eager'], '6.2f'):>7} "
            f"{_fmt(r.get('speedup_vs_eager_fp32'), '6.2f'):>7} "
            f"{_fmt(r['speedup_vs_compile'], '6.2f'):>7} {_fmt(r.get('gemm_gflops'), '8.1f'):>8} "
            f"{_pct(r.get('peak_frac')):>6} {_fmt(r['peak_mem_mb'], '8.1f'):>8} "
            f"{r['first_call_s']:>7.2f}")
    return line + (f"  [{r['note']}]" if r["note"] else "")


HEADER = (f"{'what':<24} {'dtype':<5} {'batch':>6} {'contender':<22} {'ms median (p20-p80)':>28} "
          f"{'img/s':>10} {'xeager':>7} {'xfp32':>7} {'xcomp':>7} {'GFLOP/s':>8} {'%peak':>6} "
          f"{'mem MB':>8} {'first s':>7}")

LEGEND = ("xeager: over the eager reference in the row's dtype (eager; eager-bf16 for bf16 "
          "rows); xfp32: over eager fp32 at the same batch; xcomp: over the best torch.compile "
          "mode in the row's dtype; GFLOP/s: the GEMM FLOPs / the median; %peak: of this "
          "machine's GEMM peak in the row's dtype; first s: first call incl. compile, not in "
          "the step time. bf16: autocast for eager/compile, bf16 weights + fp32 masters for "
          "fastgan.")


def peaks_line(peaks: dict) -> str:
    """The GEMM peaks of a run, one line."""
    if not peaks:
        return "GEMM peak: not measured (--no-peak)"
    any_ = next(iter(peaks.values()))
    parts = [f"{d} {p['gflops']:.0f} GFLOP/s ({p['op']})" if p["gflops"]
             else f"{d} - ({p['note']})" for d, p in peaks.items()]
    return (f"GEMM peak ({any_['n']}³, {any_['threads']} threads, best of a few calls): "
            + ", ".join(parts))


def table(records) -> str:
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in records])


def write_csv(records, path):
    from ..tools.benchmark import RECORD_FIELDS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in RECORD_FIELDS})


def plot(doc: dict, path: str) -> None:
    """Images/s and speed-up over eager vs batch size, one column per dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in doc["records"] if r["kind"] == "step" and r["median_ms"] is not None]
    if not recs:
        recs = [r for r in doc["records"] if r["median_ms"] is not None and r["pass"] == "both"]
    dtypes = sorted({r["dtype"] for r in recs}) or ["fp32"]
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5.5 * len(dtypes), 7.5), squeeze=False)
    m = doc["machine"]
    where = m.get("gpu") or m.get("cpu")
    for j, dt in enumerate(dtypes):
        rs = [r for r in recs if r["dtype"] == dt]
        for name in sorted({r["contender"] for r in rs}):
            pts = sorted((r["batch"], r["images_per_s"], r["speedup_vs_eager"] or 0)
                         for r in rs if r["contender"] == name)
            bs = [p[0] for p in pts]
            axes[0][j].plot(bs, [p[1] for p in pts], marker="o", label=name)
            axes[1][j].plot(bs, [p[2] for p in pts], marker="o", label=name)
        what = "train step" if rs and rs[0]["kind"] == "step" else "ops"
        axes[0][j].set_title(f"{what}, {dt}")
        axes[0][j].set_ylabel("images / s")
        axes[1][j].set_ylabel("speed-up over eager")
        axes[1][j].axhline(1.0, color="gray", lw=0.8)
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.grid(alpha=0.3)
        axes[0][j].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"fastgan bench — {where} — torch {m.get('torch')} — {m.get('git_commit')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ run
def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        return _run_quality(args)
    from ..impl import keep_cpu_heap
    from ..tools import benchmark as B

    cfg = config_from_args(args)
    # What B.run does first, done before the peaks and the machine record are
    # taken, so that both describe the heap the contenders run with.
    keep_cpu_heap(cfg.device)
    print(f"fastgan bench on {cfg.device} ({B.machine_info(cfg.device)['gpu'] or B.cpu_model()}); "
          f"contenders: {', '.join(c.name for c in B.contenders(cfg.device, cfg.contenders))}",
          flush=True)
    peaks = B.peaks(cfg)  # measured once per process; run() reuses it
    print(peaks_line(peaks), flush=True)
    print(HEADER, flush=True)
    machine = B.machine_info(cfg.device)
    _prepare(args.out)
    done = []

    def on_record(r):
        # Rewrite PREFIX.json after every measurement ("complete": false), so a
        # run killed by a time limit still leaves what it measured.
        print(format_row(r), flush=True)
        done.append(r)
        _write_json(dict(B.result(cfg, done, machine, peaks), complete=False), args.out + ".json")

    records = B.run(cfg, on_record=on_record)
    doc = dict(B.result(cfg, records, machine, peaks), complete=True)
    print("\n" + textwrap.fill(LEGEND, 110))
    print(peaks_line(peaks))
    print(table(records))
    _save(doc, args)
    if args.profile:
        path = args.out + "-profile.txt"
        batch = 64 if 64 in cfg.batches else cfg.batches[0]
        with open(path, "w") as f:
            for c in B.contenders(cfg.device, cfg.contenders):
                if c.compile_mode is None and not c.cuda_graph:
                    f.write(f"=== {c.name}, batch {batch}, {c.dtype or cfg.dtypes[0]}, 10 steps ===\n")
                    f.write(B.profile_step(c, batch, cfg.device, cfg.dtypes[0]) + "\n\n")
        print(f"profile: {path}")
    failed = [r for r in records if r["median_ms"] is None]
    if failed:
        print(f"{len(failed)} measurement(s) failed (see the table)", file=sys.stderr)
    return 0


def _prepare(prefix: str) -> None:
    d = os.path.dirname(prefix)
    if d:
        os.makedirs(d, exist_ok=True)


def _write_json(doc: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _save(doc, args) -> None:
    _write_json(doc, args.out + ".json")
    write_csv(doc["records"], args.out + ".csv")
    written = [args.out + ".json", args.out + ".csv"]
    if not args.no_plot:
        plot(doc, args.out + ".png")
        written.append(args.out + ".png")
    print("wrote " + ", ".join(written))


def _grid_writer(folder):
    """``on_done`` for ``time_to_quality_run``: each run's final grid into ``folder``."""
    if folder is None:
        return None
    from .sample import save_grid
    os.makedirs(folder, exist_ok=True)

    def write(run, trainer):
        save_grid(trainer.sample(trainer.fixed_noise(64)),
                  os.path.join(folder, f"{run['contender']}_seed{run['seed']}.png"))
    return write


def _run_quality(args) -> int:
    from ..tools import quality as Q
    from . import CLIError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        seeds = tuple(int(v) for v in args.seeds.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    for name in _names(args.variants):
        if name not in Q.VARIANTS:
            raise CLIError(f"--variants: unknown variant {name!r} (have {', '.join(Q.VARIANTS)})")
    if args.n_eval < 2:
        raise CLIError(f"--n-eval must be at least 2, got {args.n_eval}")
    doc = Q.time_to_quality_run(device=device, seeds=seeds, batch=args.quality_batch,
                                max_steps=args.max_steps, eval_every=args.eval_every,
                                threshold=args.fd_threshold, data=args.data,
                                cache_dir=args.cache_dir, variants=_names(args.variants),
                                n_eval=args.n_eval, log=lambda s: print(s, flush=True),
                                on_done=_grid_writer(args.grids))
    print(Q.format_time_to_quality(doc))
    d = os.path.dirname(args.out)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(args.out + "-quality.json", "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}-quality.json")
    return 0

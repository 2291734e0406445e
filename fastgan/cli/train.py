"""fastgan train: train the seed GAN on MNIST.

    fastgan train                         # built-in 5,000-digit MNIST subset, CPU or GPU
    fastgan train --data ~/data --epochs 50 --out runs/full
    fastgan train --resume                # continue runs/fastgan exactly where it stopped
    fastgan train --data synthetic --steps 500 --no-graphs   # throughput only
    fastgan train --preset seed --out runs/seed   # the seed GAN's own settings and step
    fastgan train --dtype bf16 --out runs/bf16    # bf16 weights, fp32 master weights
    torchrun --nproc_per_node 4 -m fastgan train --sync-bn   # 4 processes (DDP)

Writes to --out: checkpoint.pt (each epoch, at the end and on Ctrl-C or
SIGTERM; atomic and checksummed), metrics.jsonl (one JSON object per log line),
samples/epoch_NNNN.png (the same 64 latent vectors every epoch).

A run stops with one error line and the last good checkpoint kept when its
losses or state stop being finite (checked at each log line and before each
save), when a disk is full, or under torchrun when another process dies or
stalls longer than --dist-timeout. A second Ctrl-C stops at once (a
checkpoint being written is finished first).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import signal
import tempfile
import time
from pathlib import Path

DEFAULT_EPOCHS = 100  # 7,800 steps on the built-in 5,000 digits: about 3 minutes on 2 idle CPU cores
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def _ints(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..train.config import DTYPES, PRESETS, SCHEDULES, TrainConfig
    p = subparsers.add_parser("train", help="train the GAN (MNIST by default)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None,
                   help="MNIST IDX folder/file or mnist.npz, or 'synthetic' (default: "
                        "$FASTGAN_DATA, the usual places, else the built-in 5,000-image subset)")
    d.add_argument("--download", action="store_true", help="fetch MNIST if not found (checksummed)")
    d.add_argument("--no-verify", action="store_true",
                   help="skip checksums (for MNIST look-alikes); structure is still checked")
    r = p.add_argument_group("run")
    r.add_argument("--epochs", type=_positive, default=None,
                   help=f"total epochs (default {DEFAULT_EPOCHS})")
    r.add_argument("--steps", type=_positive, default=None,
                   help="total steps instead of --epochs (counted from the start of the run)")
    r.add_argument("--out", default="runs/fastgan", help="output folder (default runs/fastgan)")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: OUT/checkpoint.pt)")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT already holds a checkpoint")
    r.add_argument("--log-every", type=_positive, default=50,
                   help="read losses back and log every N steps (default 50)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    h = p.add_argument_group("model and optimizer (on --resume they come from the checkpoint)")
    h.add_argument("--batch-size", type=_positive, default=None, help="default 64")
    h.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4)")
    h.add_argument("--betas", type=_floats, default=None, help="Adam betas (default 0.5,0.999)")
    h.add_argument("--seed", type=int, default=None, help="default 0")
    h.add_argument("--smoothing", type=float, default=None,
                   help="one-sided label smoothing of D's real targets (default 0)")
    h.add_argument("--latent-dim", type=_positive, default=None, help="default 100")
    h.add_argument("--g-hidden", type=_ints, default=None, help="default 256,512,1024")
    h.add_argument("--d-hidden", type=_ints, default=None, help="default 1024,512,256")
    h.add_argument("--dropout", type=float, default=None, help="default 0.2")
    h.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="alternating: a D step, then a G step through the updated D; "
                        "simultaneous: the seed GAN's step, both gradients from one forward "
                        f"(default {TrainConfig.schedule})")
    h.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed: the seed GAN's settings where they are not bugs (batch 32, "
                        "Adam 1e-4 with betas 0.9,0.999 and eps 1e-7, Glorot-uniform weights "
                        "and zero biases, BatchNorm momentum 0.01 and eps 1e-3, LeakyReLU 0.3 "
                        "in G and 0.2 in D, dropout 0.2, the simultaneous schedule); flags "
                        "given as well override it")
    h.add_argument("--dtype", choices=DTYPES, default=None,
                   help="bf16: the Linear weights and GEMMs in bf16, fp32 master weights in "
                        "Adam, BatchNorm and the losses in fp32 (default fp32)")
    e = p.add_argument_group("engine")
    e.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    e.add_argument("--backend", default=None,
                   help="force a fastgan backend: reference, cpu, triton, cuda (default: best)")
    e.add_argument("--no-graphs", action="store_true", help="run the step eagerly on CUDA")
    e.add_argument("--steps-per-graph", type=_positive, default=1, metavar="K",
                   help="K steps per call (one CUDA graph replay of K steps); K must divide "
                        "the steps of an epoch (default 1)")
    e.add_argument("--reference", action="store_true",
                   help="train the plain-PyTorch models with the eager reference loop")
    e.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: G's BatchNorm statistics over all processes' batches "
                        "(default: each process its own)")
    from ..train.distributed import COLLECTIVE_TIMEOUT_S
    e.add_argument("--dist-timeout", type=float, default=None, metavar="S",
                   help="under torchrun: the longest wait in a collective for another process "
                        "before the run ends with an error (default "
                        f"{COLLECTIVE_TIMEOUT_S:g} s)")
    return p


# ------------------------------------------------------------------ setup
def resolve_device(name):
    import torch

    from . import CLIError
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device (use cpu or cuda[:i])") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise CLIError(f"--device {name}: only cpu and cuda are supported")
    return device


def _check_backend(name, device) -> str:
    """The backend that will run the fused ops on ``device`` (warns if it is the slow one)."""
    from ..ops import dispatch as backend
    from . import CLIError
    try:
        if name is None:
            return backend.select(device)
        with backend.use_backend(name):
            return backend.select(device)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--backend {name}: {e}") from None


def _widened(dtype: str) -> bool:
    """Whether the cpu backend computes ``dtype``'s GEMMs in fp32 on this CPU."""
    import torch

    from ..ops import dispatch
    cpu = dispatch._load("cpu")[0]
    return cpu is not None and cpu.gemm_path(getattr(torch, {"bf16": "bfloat16"}[dtype])) == "widened"


def _writable_folder(out: Path) -> None:
    from . import CLIError
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write there ({e.strerror or e})") from None


_CONFIG_FLAGS = {"batch_size": "--batch-size", "lr": "--lr", "betas": "--betas", "seed": "--seed",
                 "smoothing": "--smoothing", "latent_dim": "--latent-dim",
                 "g_hidden": "--g-hidden", "d_hidden": "--d-hidden", "dropout": "--dropout",
                 "reference": "--reference", "sync_bn": "--sync-bn", "schedule": "--schedule",
                 "dtype": "--dtype"}


def _config(args, saved=None, source=None):
    """The run's TrainConfig: flags over defaults, or the checkpoint's (flags must
    agree); every setting checked (``check_config``)."""
    from ..train import TrainConfig
    from ..train.config import preset
    from . import CLIError
    # "is not": 0 == False, and --dropout 0 or --lr 0 must not read as "not given".
    given = {k: getattr(args, k) for k in _CONFIG_FLAGS
             if getattr(args, k) is not None and getattr(args, k) is not False}
    base = preset(args.preset) if getattr(args, "preset", None) else {}
    if saved is None:
        cfg = TrainConfig(**{**base, **given})
    else:
        try:
            cfg = TrainConfig.from_dict(saved)
        except (TypeError, ValueError) as e:
            raise CLIError(f"{source}: its config is not valid: {e}") from None
        check_config(cfg, source)  # the file's own values first, then the flags against them
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
        for k, v in given.items():
            if getattr(cfg, k) != v:
                raise CLIError(f"{_CONFIG_FLAGS[k]} {show(v)} contradicts the checkpoint's "
                               f"{show(getattr(cfg, k))} (drop the flag to resume, or start a "
                               "new run in another --out folder)")
        for k, v in base.items():
            if k not in given and getattr(cfg, k) != v:
                raise CLIError(f"--preset {args.preset} sets {k}={show(v)}, the checkpoint has "
                               f"{show(getattr(cfg, k))} (drop --preset to resume)")
    check_config(cfg)
    return cfg


# What each TrainConfig field must be: (test, what it must be). Checked up front,
# for flags and for a checkpoint's config alike, so a run never starts with a
# setting that can only give NaN (an infinite --lr) or a traceback (a negative width).
def _whole(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _number(lo, hi, lo_open=False, hi_open=True):
    def test(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    return test


def _widths(v):
    return isinstance(v, tuple) and len(v) > 0 and all(_whole(1)(w) for w in v)


def _dtypes():
    from ..train.config import DTYPES
    return DTYPES


SEED_RANGE = (-2**63, 2**64)   # what torch.Generator.manual_seed takes
MAX_WIDTH = 1 << 16            # latent, hidden and image widths: a 65,536 x 65,536 layer is 16 GB

_FIELD_RULES = {
    "latent_dim": (lambda v: _whole(1)(v) and v <= MAX_WIDTH, f"a whole number in [1, {MAX_WIDTH}]"),
    "g_hidden": (lambda v: _widths(v) and max(v) <= MAX_WIDTH,
                 f"comma-separated whole numbers in [1, {MAX_WIDTH}]"),
    "d_hidden": (lambda v: _widths(v) and max(v) <= MAX_WIDTH,
                 f"comma-separated whole numbers in [1, {MAX_WIDTH}]"),
    "image_dim": (lambda v: _whole(1)(v) and v <= MAX_WIDTH, f"a whole number in [1, {MAX_WIDTH}]"),
    "batch_size": (_whole(1), "a whole number >= 1"),
    "lr": (_number(0, 1, lo_open=True, hi_open=False), "a finite number in (0, 1]"),
    "betas": (lambda v: isinstance(v, tuple) and len(v) == 2 and all(_number(0, 1)(b) for b in v),
              "two numbers in [0, 1)"),
    "smoothing": (_number(0, 1), "a number in [0, 1)"),
    "dropout": (_number(0, 1), "a number in [0, 1)"),
    "negative_slope": (_number(-math.inf, math.inf), "a finite number"),
    "g_negative_slope": (lambda v: v is None or _number(-math.inf, math.inf)(v), "a finite number"),
    "bn_eps": (_number(0, math.inf, lo_open=True), "a finite number > 0"),
    "bn_momentum": (lambda v: v is None or _number(0, 1, hi_open=False)(v), "a number in [0, 1]"),
    "adam_eps": (_number(0, math.inf, lo_open=True), "a finite number > 0"),
    "seed": (lambda v: _whole(SEED_RANGE[0])(v) and v < SEED_RANGE[1],
             "a whole number in [-2**63, 2**64)"),
    "reference": (lambda v: isinstance(v, bool), "true or false"),
    "sync_bn": (lambda v: isinstance(v, bool), "true or false"),
    "dtype": (lambda v: v in _dtypes(), "one of the training dtypes (fp32, bf16)"),
}


def check_config(cfg, source=None) -> None:
    """CLIError naming the flag (or the checkpoint ``source`` and the field)
    of the first setting of ``cfg`` that is not finite or out of range."""
    import dataclasses

    from . import CLIError
    for f in dataclasses.fields(cfg):
        rule = _FIELD_RULES.get(f.name)
        value = getattr(cfg, f.name)
        if rule is None or rule[0](value):
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        if source is None:
            flag = _CONFIG_FLAGS.get(f.name, f.name)
            raise CLIError(f"{flag} must be {rule[1]}, got {shown}")
        raise CLIError(f"{source}: its config has {f.name}={shown!r}, which must be {rule[1]} "
                       "(a damaged or hand-edited checkpoint)")


def check_seed(seed, flag: str) -> None:
    from . import CLIError
    if not (SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise CLIError(f"{flag} must be a whole number in [-2**63, 2**64), got {seed}")


def config_of(state: dict, source):
    """The checked TrainConfig of a loaded checkpoint (``fastgan sample`` and ``eval``)."""
    from ..train import ConfigError, TrainConfig
    from . import CLIError
    try:
        cfg = TrainConfig.from_dict(state["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise CLIError(f"{source}: its config is not valid: {e}") from None
    check_config(cfg, source)
    return cfg


def _load_data(args):
    from ..train import data
    if args.data == "synthetic":
        return data.synthetic()
    return data.load_mnist(args.data, download=args.download, verify=not args.no_verify)


# ------------------------------------------------------------------ run
class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop at a step boundary with a
    checkpoint: in one process after the current step; under torchrun at the
    next log line, where the ranks agree (``fastgan.train.distributed.agree``)
    so that all stop at the same step and save one checkpoint together (a rank
    that started the collective save alone would wait for the others forever).

    A repeat within ``REPEAT_S`` is the same request: torchrun forwards the
    terminal's Ctrl-C to workers that got it already. A later one stops at once,
    without a checkpoint, except during a checkpoint write, which finishes first
    (``deferred``)."""

    REPEAT_S = 1.0
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal = 0          # the first signal received (0: none)
        self._first = 0.0
        self._deferring = self._pending = False
        self._old = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            try:
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a library): no handler
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.signal:
            self.signal, self._first = signum, now
        elif now - self._first >= self.REPEAT_S:
            if not self._deferring:
                raise KeyboardInterrupt
            self._pending = True

    @contextlib.contextmanager
    def deferred(self):
        """A block that a second signal does not cut short (a checkpoint write);
        the run stops right after it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            raise KeyboardInterrupt

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _reason(e: BaseException) -> str:
    """The informative part of a gloo/NCCL/CUDA error: its first sentence
    without the source-file prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def run(args) -> int:
    from ..train import distributed
    try:
        return _run(args)
    finally:
        # Leave the process group on every way out: a rank that exits with its
        # group still up aborts in gloo's threads instead of exiting cleanly.
        distributed.shutdown()


def _run(args) -> int:
    import datetime

    import torch
    from tqdm import tqdm

    from ..train import checkpoint
    from ..train import Trainer
    from . import CLIError
    from .sample import save_grid

    from ..train import distributed
    timeout_s = distributed.COLLECTIVE_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise CLIError(f"--dist-timeout must be a number of seconds > 0, got {timeout_s}")
    ctx = None
    if distributed.launched():  # torchrun: NCCL on cuda:LOCAL_RANK, or gloo on CPUs
        try:
            ctx = distributed.init(args.device, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"torch.distributed: {_reason(e)}") from None
        device = ctx.device
    else:
        device = resolve_device(args.device)
    say = print if ctx is None or ctx.is_main else (lambda *a, **k: None)
    out = Path(args.out)
    _writable_folder(out)
    ckpt_path = out / CHECKPOINT
    if ctx is None or ctx.is_main:
        # A process killed while saving (SIGKILL, power loss) leaves its temp file.
        stale = (checkpoint.remove_stale_temps(out, CHECKPOINT)
                 + checkpoint.remove_stale_temps(out / "samples", "*.png"))
        if stale:
            say(f"removed {len(stale)} temp file(s) of an interrupted save: "
                f"{', '.join(p.name for p in stale)}", flush=True)
    saved, src = None, None
    if args.resume is not None:
        src = Path(args.resume) if args.resume else ckpt_path
        saved = checkpoint.load(src)
    elif ckpt_path.exists() and not args.overwrite:
        raise CLIError(f"{ckpt_path} already exists: pass --resume to continue that run or "
                       "--overwrite to start a new one there")
    cfg = _config(args, saved and saved["config"], src)

    if args.backend and cfg.reference:
        raise CLIError("--backend has no effect with --reference (plain PyTorch only)")
    graphs = device.type == "cuda" and not args.no_graphs
    if cfg.reference:
        engine = "eager plain-PyTorch reference loop"
    else:
        name = _check_backend(args.backend, device)
        graphs = graphs and name != "reference"  # its ops cannot be captured
        engine = f"fused GANStep, backend {name}" + (", CUDA graph" if graphs else ", eager")
        if device.type == "cpu" and ctx is None:
            engine += " without autograd"   # (fastgan.train.tape; DDP needs autograd's hooks)
    engine += f", {cfg.schedule} schedule"
    if cfg.dtype != "fp32":
        engine += f", {cfg.dtype} weights with fp32 master weights"
        if not cfg.reference and name == "cpu" and _widened(cfg.dtype):
            engine += (f" ({cfg.dtype} GEMMs computed in fp32: this CPU has no native "
                       f"{cfg.dtype} instructions, so fp32 trains faster here)")

    dataset = _load_data(args)
    if cfg.batch_size > len(dataset):
        raise CLIError(f"--batch-size {cfg.batch_size} is larger than the dataset "
                       f"({len(dataset):,} images)")
    if ctx is not None:
        engine += f", {ctx.world_size} processes (DDP)"
    say(f"data: {dataset.source}", flush=True)
    say(f"engine: {engine} on {device}", flush=True)
    backend_ctx = _backend_context(args.backend)
    with backend_ctx:
        trainer = Trainer(cfg, dataset.images, device, graphs=graphs and not cfg.reference,
                          steps_per_call=args.steps_per_graph,
                          data_id=f"{dataset.fingerprint()} ({len(dataset)} images)", dist=ctx)
        if saved is not None:
            trainer.load_state_dict(saved)
        spe = trainer.steps_per_epoch
        total = args.steps if args.steps else (args.epochs or DEFAULT_EPOCHS) * spe
        if trainer.steps >= total:
            say(f"nothing to do: the checkpoint is at step {trainer.steps} of {total}")
            return 0
        if (total - trainer.steps) % args.steps_per_graph:
            raise CLIError(f"--steps-per-graph {args.steps_per_graph} must divide the "
                           f"{total - trainer.steps} steps left to run")
        on_disk = trainer.steps if src is not None and src == ckpt_path else None
        # What exists now (torch's modules, the models, the data) lives for the
        # whole run: frozen out of the cyclic collector's scans. A full collection
        # over these ~300K objects took 155 ms on a 2-core CPU, about one every
        # 400 steps (0.4 ms a step on average); the step's own garbage is young.
        # Unfrozen after the run for a caller of main() in the same process (unless
        # that caller had frozen objects itself: gc has no partial unfreeze).
        caller_froze = gc.get_freeze_count() > 0
        gc.freeze()
        try:
            return _loop(trainer, total, out, args, tqdm, save_grid, checkpoint, torch, on_disk)
        finally:
            if not caller_froze:
                gc.unfreeze()


def _backend_context(name):
    import contextlib

    from .. import use_backend
    return use_backend(name) if name else contextlib.nullcontext()


def _loop(trainer, total, out, args, tqdm, save_grid, checkpoint, torch, on_disk=None) -> int:
    """Train to step ``total``, logging, sampling and checkpointing; returns the
    exit status. ``on_disk``: the step of ``OUT/checkpoint.pt`` when the run
    resumed from it (for the messages of a run that fails)."""
    from ..train import distributed
    from . import AgreedError, CLIError
    spe, B, ctx = trainer.steps_per_epoch, trainer.cfg.batch_size, trainer.dist
    z = trainer.fixed_noise(64)
    # A resumed run appends to its metrics; a new run starts the file afresh.
    metrics = open(out / METRICS if trainer.is_main else os.devnull,
                   "a" if args.resume is not None else "w")
    ckpt_path = out / CHECKPOINT
    kept = [on_disk]  # the step of the checkpoint this run leaves on disk, if any

    def intact() -> str:
        if kept[0] is None:
            return "no checkpoint of this run was written before it"
        return f"{ckpt_path} (step {kept[0]}) is intact"

    def diverged(what: str) -> AgreedError:
        return AgreedError(f"training diverged at step {trainer.steps}: {what} not finite; "
                           f"stopped without saving it, {intact()} (lower --lr, or resume "
                           "from that checkpoint)")

    def save_checkpoint(png: Path) -> None:
        state = trainer.state_dict()  # on every rank: it gathers their RNG streams
        bad = checkpoint.first_nonfinite(state)
        # Decided together: rank 0 must not write while another rank stops.
        if distributed.agree(ctx, bad is not None)[0]:
            raise diverged(bad or "another rank's state")
        if trainer.is_main:
            with stop.deferred():  # a second Ctrl-C waits for the write to finish
                try:
                    save_grid(trainer.sample(z), png)
                except OSError as e:
                    raise CLIError(f"{png}: cannot write the sample grid "
                                   f"({e.strerror or e}); {intact()}") from None
                checkpoint.save(state, ckpt_path)
        kept[0] = trainer.steps

    def log(kind, **extra):
        nonlocal t_last, s_last
        now = time.perf_counter()
        means = trainer.step.read_means()  # the one host sync per log line
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        steps = trainer.steps - s_last
        rate = steps / max(now - t_last, 1e-9)
        # JSON has no NaN: a non-finite mean is written as null and named.
        rec = {"kind": kind, "step": trainer.steps, "epoch": trainer.steps / spe,
               **{k: (round(v, 5) if math.isfinite(v) else None) for k, v in means.items()},
               "steps_per_s": round(rate, 3), "images_per_s": round(rate * B, 1),
               "elapsed_s": round(now - t0, 2), "saving_s": round(saving, 2),
               **extra, **({"nonfinite": bad} if bad else {})}
        if trainer.is_main:
            try:
                metrics.write(json.dumps(rec, allow_nan=False) + "\n")
                metrics.flush()
            except OSError as e:
                raise CLIError(f"{out / METRICS}: cannot write ({e.strerror or e}); "
                               f"{intact()}") from None
        t_last, s_last = now, trainer.steps
        return rec, bad

    bar = tqdm(total=total, initial=trainer.steps, unit="step", dynamic_ncols=True,
               disable=args.no_progress or not trainer.is_main)
    stop = _Interrupt()
    t0 = t_last = time.perf_counter()
    s_last = trainer.steps
    saving = 0.0     # seconds spent writing checkpoints and grids (not in the rates)
    stopped = 0      # the signal that stopped the run (agreed by all ranks)
    logging = False  # where an error surfaced: in the log's host sync or in a step
    try:
        while trainer.steps < total:
            trainer.train_step()
            k = trainer.step.steps_per_call
            bar.update(k)
            epoch_end = trainer.steps % spe == 0
            crossed = trainer.steps // args.log_every != (trainer.steps - k) // args.log_every
            if epoch_end or crossed or trainer.steps == total:
                png = out / "samples" / f"epoch_{trainer.steps // spe:04d}.png"
                # Log first, so the rates do not include writing the grid and checkpoint.
                logging = True
                rec, bad = log("epoch", sample=str(png)) if epoch_end else log("log")
                logging = False
                # The ranks' one decision point: a signal on any rank, NaN on any rank.
                sig, nonfinite = distributed.agree(ctx, stop.signal, bool(bad))
                if nonfinite:
                    raise diverged(", ".join(bad) if bad else "another rank's losses")
                if epoch_end:
                    t_save = time.perf_counter()
                    save_checkpoint(png)
                    # The next rate counts steps only: its clock starts after the save.
                    t_last = time.perf_counter()
                    saving += t_last - t_save
                bar.set_postfix_str(
                    f"ep {trainer.steps / spe:.1f} | {rec['images_per_s']:.0f} img/s | "
                    f"D {rec['d_loss']:.3f} G {rec['g_loss']:.3f} | "
                    f"D(x) {rec['d_real']:.2f} D(G(z)) {rec['d_fake']:.2f}", refresh=False)
                if sig:
                    stopped = sig
                    break
            elif stop.signal and not ctx.distributed:
                stopped = stop.signal
                break
        if trainer.steps % spe != 0:  # stopped mid-epoch: a last grid and checkpoint
            save_checkpoint(out / "samples" / f"step_{trainer.steps:07d}.png")
    except RuntimeError as e:
        if ctx.distributed and distributed.is_comm_error(e):
            wait = args.dist_timeout or distributed.COLLECTIVE_TIMEOUT_S
            raise CLIError(f"lost contact with the other processes after step {trainer.steps} "
                           f"({_reason(e)}): another rank died, was stopped or stalled longer "
                           f"than --dist-timeout {wait:g} s; {intact()}") from None
        if getattr(trainer.step, "graphs", False):
            k = trainer.step.steps_per_call
            steps = (f"steps {s_last + 1}-{trainer.steps}" if logging
                     else f"step {trainer.steps + 1}" if k == 1
                     else f"steps {trainer.steps + 1}-{trainer.steps + k}")
            raise CLIError(f"the CUDA graph replay failed in {steps} ({_reason(e)}); "
                           f"{intact()}; run with --no-graphs to find the failing op") from None
        raise
    finally:
        # An exception (or a second Ctrl-C) may have stopped a step half way:
        # then no checkpoint is written, so the last good one stays intact.
        stop.restore()
        bar.close()
        metrics.close()
    elapsed = time.perf_counter() - t0
    status = 128 + stopped if stopped else 0
    if not trainer.is_main:
        return status
    if stopped:
        name = signal.Signals(stopped).name
        print(f"interrupted at step {trainer.steps} ({name}{' on a rank' if ctx.distributed else ''}"
              f"); checkpoint saved to {ckpt_path} (continue with --resume)")
    else:
        print(f"done: {trainer.steps} steps ({trainer.steps / spe:.1f} epochs) in "
              f"{elapsed:.0f} s; checkpoint {ckpt_path}, samples in {out / 'samples'}")
    return status

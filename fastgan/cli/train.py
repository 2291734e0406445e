"""fastgan train: train the seed GAN on MNIST.

    fastgan train                         # built-in 5,000-digit MNIST subset, CPU or GPU
    fastgan train --data ~/data --epochs 50 --out runs/full
    fastgan train --resume                # continue runs/fastgan exactly where it stopped
    fastgan train --data synthetic --steps 500 --no-graphs   # throughput only
    torchrun --nproc_per_node 4 -m fastgan train --sync-bn   # 4 processes (DDP)

Writes to --out: checkpoint.pt (each epoch, at the end and on Ctrl-C; atomic),
metrics.jsonl (one JSON object per log line), samples/epoch_NNNN.png (the
same 64 latent vectors every epoch).
"""
from __future__ import annotations

import argparse
import json
import os
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
                 "reference": "--reference", "sync_bn": "--sync-bn"}


def _config(args, saved=None):
    """The run's TrainConfig: flags over defaults, or the checkpoint's (flags must agree)."""
    from ..train import TrainConfig
    from . import CLIError
    given = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) not in (None, False)}
    if saved is None:
        cfg = TrainConfig(**given)
    else:
        cfg = TrainConfig.from_dict(saved)
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
        for k, v in given.items():
            if getattr(cfg, k) != v:
                raise CLIError(f"{_CONFIG_FLAGS[k]} {show(v)} contradicts the checkpoint's "
                               f"{show(getattr(cfg, k))} (drop the flag to resume, or start a "
                               "new run in another --out folder)")
    if not (cfg.lr > 0 and len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas)):
        raise CLIError(f"--lr must be > 0 and --betas two numbers in [0, 1), got lr={cfg.lr}, "
                       f"betas={cfg.betas}")
    if not 0 <= cfg.dropout < 1:
        raise CLIError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    return cfg


def _load_data(args):
    from ..train import data
    if args.data == "synthetic":
        return data.synthetic()
    return data.load_mnist(args.data, download=args.download, verify=not args.no_verify)


# ------------------------------------------------------------------ run
class _Interrupt:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop now."""

    def __init__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. called from a library): no handler
            self._old = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..train import checkpoint
    from ..train import Trainer
    from . import CLIError
    from .sample import save_grid

    from ..train import distributed
    ctx = None
    if distributed.launched():  # torchrun: NCCL on cuda:LOCAL_RANK, or gloo on CPUs
        try:
            ctx = distributed.init(args.device)
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"torch.distributed: {e}") from None
        device = ctx.device
    else:
        device = resolve_device(args.device)
    say = print if ctx is None or ctx.is_main else (lambda *a, **k: None)
    out = Path(args.out)
    _writable_folder(out)
    ckpt_path = out / CHECKPOINT
    saved = None
    if args.resume is not None:
        src = Path(args.resume) if args.resume else ckpt_path
        saved = checkpoint.load(src)
    elif ckpt_path.exists() and not args.overwrite:
        raise CLIError(f"{ckpt_path} already exists: pass --resume to continue that run or "
                       "--overwrite to start a new one there")
    cfg = _config(args, saved and saved["config"])

    if args.backend and cfg.reference:
        raise CLIError("--backend has no effect with --reference (plain PyTorch only)")
    graphs = device.type == "cuda" and not args.no_graphs
    if cfg.reference:
        engine = "eager plain-PyTorch reference loop"
    else:
        name = _check_backend(args.backend, device)
        graphs = graphs and name != "reference"  # its ops cannot be captured
        engine = f"fused GANStep, backend {name}" + (", CUDA graph" if graphs else ", eager")

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
        try:
            return _loop(trainer, total, out, args, tqdm, save_grid, checkpoint, torch)
        finally:
            distributed.shutdown()


def _backend_context(name):
    import contextlib

    from .. import use_backend
    return use_backend(name) if name else contextlib.nullcontext()


def _loop(trainer, total, out, args, tqdm, save_grid, checkpoint, torch) -> int:
    spe, B = trainer.steps_per_epoch, trainer.cfg.batch_size
    z = trainer.fixed_noise(64)
    # A resumed run appends to its metrics; a new run starts the file afresh.
    metrics = open(out / METRICS if trainer.is_main else os.devnull,
                   "a" if args.resume is not None else "w")
    ckpt_path = out / CHECKPOINT

    def save_checkpoint():
        state = trainer.state_dict()  # on every rank: it gathers their RNG streams
        if trainer.is_main:
            checkpoint.save(state, ckpt_path)

    def log(kind, **extra):
        nonlocal t_last, s_last
        now = time.perf_counter()
        means = trainer.step.read_means()  # the one host sync per log line
        steps = trainer.steps - s_last
        rate = steps / max(now - t_last, 1e-9)
        rec = {"kind": kind, "step": trainer.steps, "epoch": trainer.steps / spe,
               **{k: round(v, 5) for k, v in means.items()},
               "steps_per_s": round(rate, 3), "images_per_s": round(rate * B, 1),
               "elapsed_s": round(now - t0, 2), **extra}
        if trainer.is_main:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        t_last, s_last = now, trainer.steps
        return rec

    bar = tqdm(total=total, initial=trainer.steps, unit="step", dynamic_ncols=True,
               disable=args.no_progress or not trainer.is_main)
    stop = _Interrupt()
    t0 = t_last = time.perf_counter()
    s_last = trainer.steps
    status = 0
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
                rec = log("epoch", sample=str(png)) if epoch_end else log("log")
                if epoch_end:
                    if trainer.is_main:
                        save_grid(trainer.sample(z), png)
                    save_checkpoint()
                bar.set_postfix_str(
                    f"ep {trainer.steps / spe:.1f} | {rec['images_per_s']:.0f} img/s | "
                    f"D {rec['d_loss']:.3f} G {rec['g_loss']:.3f} | "
                    f"D(x) {rec['d_real']:.2f} D(G(z)) {rec['d_fake']:.2f}", refresh=False)
            if stop.requested:
                status = 130
                break
    finally:
        # An exception (or a second Ctrl-C) may have stopped a step half way:
        # then no checkpoint is written, so the last good one stays intact.
        stop.restore()
        bar.close()
        metrics.close()
    if trainer.steps % spe != 0:  # stopped mid-epoch: a last grid and checkpoint
        if trainer.is_main:
            save_grid(trainer.sample(z), out / "samples" / f"step_{trainer.steps:07d}.png")
        save_checkpoint()
    elapsed = time.perf_counter() - t0
    if not trainer.is_main:
        return status
    if status:
        print(f"interrupted at step {trainer.steps}; checkpoint saved to {ckpt_path} "
              f"(continue with --resume)")
    else:
        print(f"done: {trainer.steps} steps ({trainer.steps / spe:.1f} epochs) in "
              f"{elapsed:.0f} s; checkpoint {ckpt_path}, samples in {out / 'samples'}")
    return status

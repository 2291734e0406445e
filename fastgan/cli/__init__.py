"""The ``fastgan`` command line.

Each subcommand is a module ``fastgan/cli/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``. ``train`` and ``sample`` are always there; ``eval`` and
``bench`` are registered when their modules are present.

User mistakes (missing data, a bad checkpoint, an impossible setting) and
failures of the machine (a full disk, a lost peer process, no memory) end with
one ``fastgan <command>: error: ...`` line and exit status 1, never a
traceback; Ctrl-C with ``fastgan <command>: interrupted`` and status 130.
Under torchrun, ranks other than 0 say which rank they are.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

COMMANDS = ("train", "sample", "eval", "bench")
OPTIONAL = ("eval", "bench")


class CLIError(Exception):
    """A user mistake: main() prints the message on one line and exits 1."""


class AgreedError(CLIError):
    """An error every rank of a torchrun run raises alike (they agreed on it):
    rank 0 alone prints it."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..train.checkpoint import CheckpointError
    from ..train.data import DataError
    from ..train import ConfigError, GraphCaptureError
    return CLIError, CheckpointError, DataError, ConfigError, GraphCaptureError


def _load(name: str):
    """The command's module, or None when an optional one has not landed yet."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if name in OPTIONAL and e.name == f"{__name__}.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="fastgan", description="Train, sample, evaluate and benchmark fastgan's GAN.")
    parser.add_argument("--version", action="version", version=f"fastgan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        mod.add_parser(sub)
        sub.choices[name].set_defaults(_run=mod.run)
    return parser


def _one_line_warnings() -> None:
    # Library warnings (e.g. "using the slow reference backend") as one clean
    # line each, printed through tqdm so they do not break a progress bar.
    def show(message, category, filename, lineno, file=None, line=None):
        try:
            from tqdm import tqdm
            tqdm.write(f"fastgan: warning: {message}", file=sys.stderr)
        except Exception:
            print(f"fastgan: warning: {message}", file=sys.stderr)
    warnings.showwarning = show


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where else e.strerror
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) or "can't allocate memory" in text or \
            type(e).__name__ == "OutOfMemoryError":
        return f"out of memory ({text[:200] or type(e).__name__}); try a smaller --batch-size or model"
    return text or type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings()
    rank = _rank()
    who = f"rank {rank}: " if rank else ""
    try:
        return int(args._run(args) or 0)
    except _user_errors() as e:
        if not (rank and isinstance(e, AgreedError)):
            print(f"fastgan {args.command}: error: {who}{_one_line(e)}", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as e:  # the machine's, not the user's: a full disk, no memory
        print(f"fastgan {args.command}: error: {who}{_one_line(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if _one_line(e).startswith("out of memory"):
            print(f"fastgan {args.command}: error: {who}{_one_line(e)}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"fastgan {args.command}: {who}interrupted", file=sys.stderr)
        return 130


def command(argv=None) -> None:
    """The ``fastgan`` console command (and ``python -m fastgan``): ``main``, then exit.

    A process that ran as a torchrun rank leaves with ``os._exit`` once its
    output is flushed and Python's exit handlers ran: c10d leaves gloo's
    threads running after the process group is destroyed, and letting the
    interpreter and C++ static destructors tear them down aborted a rank that
    had already finished (``train.distributed.left_a_group``). Everything
    else exits through ``sys.exit`` as usual.
    """
    status = main(argv)
    from ..train import distributed
    if distributed.left_a_group():
        import atexit
        atexit._run_exitfuncs()   # logging.shutdown and the like: what sys.exit would run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

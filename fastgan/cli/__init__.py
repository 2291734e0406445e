"""The ``fastgan`` command line.

Each subcommand is a module ``fastgan/cli/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``. ``train`` and ``sample`` are always there; ``eval`` and
``bench`` are registered when their modules are present.

User mistakes (missing data, a bad checkpoint, an impossible setting) end with
one ``fastgan <command>: error: ...`` line and exit status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = ("train", "sample", "eval", "bench")
OPTIONAL = ("eval", "bench")


class CLIError(Exception):
    """A user mistake: main() prints the message on one line and exits 1."""


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings()
    try:
        return int(args._run(args) or 0)
    except _user_errors() as e:
        print(f"fastgan {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastgan {args.command}: interrupted", file=sys.stderr)
        return 130

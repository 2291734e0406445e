"""``python tests/faults/fault_driver.py ARGS...`` runs ``fastgan ARGS...`` with
one fault injected, chosen by the environment (the fault-injection tests set it):

    FAULT=KIND:RANK:STEP   KIND on rank RANK right after its step STEP:
        sigint, sigterm, sigkill, sigstop   os.kill of itself with that signal
        raise                               a one-rank failure (OSError ENOSPC,
                                            as a full disk on that rank gives)
        nan                                 G's first weight becomes NaN
    FAULT=KIND:RANK:save   KIND during rank RANK's first checkpoint write of
        its step >= SAVE_AFTER (default 0), once the temp file is complete:
        sigkill                             the process dies there
        sigint2                             Ctrl-C, and another 1.5 s later
        enospc                              the write fails: disk full
    KEEP=1                 also copy every checkpoint written to
                           checkpoint.step<N>.pt (the reference run)
    FAULT_STAMP=PATH       write the time.time() of the fault there

Nothing of this is part of fastgan: it patches the trainer and ``os`` of
this one process and then calls ``fastgan.cli.command``, as the console command does.
"""
import errno
import os
import shutil
import signal
import sys
import time

import torch

from fastgan.cli import command
from fastgan.train import checkpoint
from fastgan.train import trainer as trainer_module

SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL,
           "sigstop": signal.SIGSTOP}
RANK = int(os.environ.get("RANK", "0"))
kind, rank, when = (os.environ.get("FAULT") or "none:0:0").split(":")
mine = int(rank) == RANK
save_after = int(os.environ.get("SAVE_AFTER", "0"))
state = {"steps": 0, "fired": False}


def fire() -> None:
    state["fired"] = True
    if os.environ.get("FAULT_STAMP"):
        with open(os.environ["FAULT_STAMP"], "w") as f:
            f.write(repr(time.time()))

Trainer = trainer_module.Trainer
_train_step = Trainer.train_step


def train_step(self):
    out = _train_step(self)
    state["steps"] = self.steps
    if mine and when != "save" and self.steps == int(when) and not state["fired"]:
        fire()
        if kind == "raise":
            raise OSError(errno.ENOSPC, f"No space left on device (injected on rank {RANK})")
        if kind == "nan":
            with torch.no_grad():
                next(self.G.parameters()).view(-1)[0] = float("nan")
        else:
            os.kill(os.getpid(), SIGNALS[kind])
    return out


Trainer.train_step = train_step

_fsync = os.fsync


def fsync(fd):
    # write_atomic fsyncs the complete temp file before it replaces the target.
    name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
    if (mine and when == "save" and ".checkpoint.pt." in name and not state["fired"]
            and state["steps"] >= save_after):
        fire()
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sigint2":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.5)  # past the handler's repeat window: a real second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        elif kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
    return _fsync(fd)


os.fsync = fsync

if os.environ.get("KEEP"):
    _save = checkpoint.save

    def save(st, path):
        out = _save(st, path)
        shutil.copyfile(out, out.with_name(f"checkpoint.step{st['steps']}.pt"))
        return out

    checkpoint.save = save

if __name__ == "__main__":
    command(sys.argv[1:])   # as the fastgan console command ends

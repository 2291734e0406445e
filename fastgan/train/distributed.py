"""Multi-process training on ``torch.distributed``.

``torchrun --nproc_per_node N -m fastgan train ...`` starts N processes; each
calls ``init()``, which joins the process group (NCCL on GPUs, one GPU per
process at ``cuda:LOCAL_RANK``; gloo on CPUs) and returns a ``Context``:

* G and D are wrapped separately in ``DistributedDataParallel`` (``wrap``)
  with ``broadcast_buffers=False``: BN running statistics are not overwritten
  by rank 0's on every forward. They stay per rank with local statistics (the
  default), or identical on every rank with synchronized statistics.
* Each rank trains on its own shard of the data (``Context.shard``), with its
  own noise and dropout streams (``Context.seed``): ranks never draw the same
  noise or mask.
* Rank 0 logs and writes checkpoints. A checkpoint holds plain (unwrapped)
  ``state_dict``s, so one written by N ranks loads in one process and back;
  the RNG streams of all ranks are gathered into it (``gather``).

Synchronized batch statistics
-----------------------------
``convert_sync_batchnorm(model)`` makes every ``fastgan.nn.LinearBNAct`` of
``model`` normalize with the statistics of the global batch (all ranks), as
``nn.SyncBatchNorm`` does for ``nn.BatchNorm1d``. While torch.distributed is
initialized with more than one rank, such a layer's training forward runs
``SyncLinearBNActFunction``: the Linear with ATen, one all-reduce of the
per-column sum, sum of squares (fp64, so E[h^2] - E[h]^2 loses nothing) and
count, then normalize + activation + dropout with the op's Philox mask (same
seed, offset and element numbering as ``torch.ops.fastgan.linear_bn_act``);
backward all-reduces sum(dz) and sum(dz * xhat). No value is read on the host,
so the step stays capturable in a CUDA graph. Eval forwards and single-process
runs take the fused op unchanged. Local statistics stay the default.

CUDA graphs with DDP (PyTorch's documented rules for capturing a whole
backward with its NCCL all-reduces; NCCL >= 2.9.6):

1. DDP is constructed on a side stream (``wrap`` does it): its buckets and
   autograd hooks must not be tied to the default stream.
2. At least 11 DDP-enabled eager iterations run before capture (DDP rebuilds
   its buckets after the first iterations): ``GRAPH_WARMUP``; the engine's
   ``GANStep(warmup=...)`` uses it when the models are wrapped.
3. Every rank captures and replays the same graph: the NCCL calls in it are
   collective. On PyTorch < 2.2 also set ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``
   before ``init()`` (newer versions handle the watchdog during capture).

A failing rank
--------------
Nothing here waits forever on a peer. ``init`` sets a collective timeout
(``COLLECTIVE_TIMEOUT_S``, gloo and NCCL alike; PyTorch's default is 30
minutes for gloo), so a rank that stalls or dies mid-collective fails the
others' next collective within it; a gloo peer that exits or is killed fails
them at once (its sockets close). ``is_comm_error`` tells such a failure from
others, so the trainer reports it in one line, and torchrun then stops the
remaining ranks. NCCL's watchdog ends a process whose collective timed out.

Decisions that change what the ranks do next (stop on a signal, stop on
divergence) are taken together: ``agree`` all-reduces a few integers (MAX)
at the log lines, where the host reads the losses anyway, so every rank stops
at the same step and the collective checkpoint save finds all of them there.
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..impl import reference as R
from ..ops import checks as _checks
from ..nn.layers import LinearBNAct

GRAPH_WARMUP = 11   # eager DDP iterations before a CUDA graph capture (rule 2 above)
# Longest wait in a collective for a peer (init's default). Long enough for
# rank 0's checkpoint write and a first step's kernel compilation, which the
# others wait out in their next collective; short enough that a stalled rank
# ends the run in about a minute.
COLLECTIVE_TIMEOUT_S = 60.0

# Words of the errors gloo, NCCL and c10d raise when a peer is gone or silent.
_COMM_WORDS = ("gloo", "nccl", "c10d", "processgroup", "connection closed", "connection reset",
               "connection refused", "broken pipe", "timed out", "timeout", "socket")


# ----------------------------------------------------------------------------- process group
@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands in the run. Batch sizes stay per process: N
    ranks with ``--batch-size B`` train on N * B images per step."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, data: Tensor) -> Tensor:
        """This rank's rows of ``data``: every world_size-th row from ``rank``,
        trimmed so every rank has the same number (and so the same steps per epoch)."""
        if not self.distributed:
            return data
        n = data.shape[0] // self.world_size
        if n == 0:
            raise ValueError(f"data: {data.shape[0]} rows cannot be shared by "
                             f"{self.world_size} ranks")
        return data[self.rank::self.world_size][:n]

    def seed(self, seed: int, *salt: int) -> int:
        """``seed`` for this rank: unchanged in one process, distinct per rank otherwise."""
        if not self.distributed:
            return seed
        h = 0x9E3779B97F4A7C15
        for v in (seed, *salt, self.rank, 0xD157):
            h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
            h ^= h >> 31
        return h & 0x7FFFFFFFFFFFFFFF

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` (every rank must call it)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def agree(ctx: Context, *values: int) -> list[int]:
    """The maximum of each integer over all ranks: one small all-reduce that
    every rank must call at the same point. In one process, the values as given."""
    if not ctx.distributed:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed (a peer died, left or timed out)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _COMM_WORDS)


def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device=None, timeout: Optional[datetime.timedelta] = None) -> Context:
    """Join the process group torchrun describes in the environment.

    ``device``: ``"cpu"`` forces gloo on CPUs; ``None`` or ``"cuda"`` takes
    ``cuda:LOCAL_RANK`` with NCCL when GPUs are present. Outside torchrun (or
    with one process) nothing is initialized and a one-process ``Context`` on
    ``device`` is returned. ``timeout``: the longest wait for a peer in a
    collective (default ``COLLECTIVE_TIMEOUT_S``).
    """
    want = torch.device(device) if device is not None else None
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        default = "cuda" if torch.cuda.is_available() else "cpu"
        return Context(device=want if want is not None else torch.device(default))
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if dist.is_initialized():  # the caller joined a group already
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
    if want is not None and want.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {want}: no CUDA GPU is available here")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} "
                               "visible (one process per GPU: --nproc_per_node <= GPUs)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if timeout is None:
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timeout, **kw)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                   device=dev)


_left_a_group = False


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    global _left_a_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


def left_a_group() -> bool:
    """Whether this process ran as a rank: its gloo threads outlive shutdown().

    With gloo, ``destroy_process_group`` does not stop the backend once a
    ``DistributedDataParallel`` was built on it: c10d keeps the backend, and its
    worker and socket threads, alive until the process ends. Tearing those down
    with the interpreter can abort the process (SIGABRT, "terminate called
    without an active exception") after the run has finished and saved;
    ``fastgan.cli.command`` therefore ends such a process with ``os._exit``.
    """
    return _left_a_group


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """``module`` in DistributedDataParallel (as is in one process).

    ``broadcast_buffers=False`` keeps each rank's BN running statistics; DDP
    is constructed on a side stream so the step can be graph-captured later.
    """
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    # Newer PyTorch renames broadcast_buffers=False to forward_sync_buffers=False
    # (buffers still synced once at construction: every rank starts from rank 0's).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kw = {"forward_sync_buffers": False}
    else:
        kw = {"broadcast_buffers": False}
    if ctx.device.type != "cuda":
        return DDP(module, **kw)
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        ddp = DDP(module, device_ids=[ctx.device.index], **kw)
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    return ddp


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    return module.module if isinstance(module, DDP) else module


# ----------------------------------------------------------------------------- synchronized BN
class SyncStats:
    """``LinearBNAct.sync_stats``: all-reduce batch statistics over ``process_group``
    (None = every rank), active while torch.distributed runs with > 1 rank."""

    def __init__(self, process_group=None):
        self.process_group = process_group

    def active(self) -> bool:
        return (dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def __call__(self, layer: LinearBNAct, x: Tensor) -> Tensor:
        a, bn = layer.op_inputs(x), layer[1]
        tensors = (a.x, a.weight, a.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   bn.num_batches_tracked)
        hyper = (bn.momentum, float(bn.eps), a.activation, a.negative_slope, a.p, a.seed,
                 a.offset)
        _checks.linear_bn_act(*tensors, True, *hyper)
        with torch.autocast(a.x.device.type, enabled=False):
            return SyncLinearBNActFunction.apply(*tensors, *hyper, self.process_group)

    def __repr__(self):
        return f"SyncStats(process_group={self.process_group!r})"


def convert_sync_batchnorm(model: nn.Module, process_group=None,
                           enabled: bool = True) -> nn.Module:
    """Switch every ``LinearBNAct`` of ``model`` to global-batch statistics
    (``enabled=False`` switches back to local ones); returns ``model``.

    Plain ``nn.BatchNorm1d`` layers are left to ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    for m in model.modules():
        if isinstance(m, LinearBNAct):
            m.sync_stats = SyncStats(process_group) if enabled else None
    return model


class SyncLinearBNActFunction(torch.autograd.Function):
    """Training forward/backward of linear_bn_act with statistics over all ranks.

    The math is the reference backend's with the batch reductions replaced by
    all-reduced ones; parameter gradients stay local sums (DDP averages them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, momentum, eps, activation, negative_slope, p, seed, offset,
                group):
        acc = R.acc_dtype(x)
        h = F.linear(x, weight, bias)
        # One all-reduce of per-column sum, sum of squares (fp64, so E[h^2] -
        # E[h]^2 loses nothing) and the row count; the count stays a tensor so
        # nothing is read on the host.
        h64 = h.to(torch.float64)
        count = torch.full((1,), h.shape[0], dtype=torch.float64, device=x.device)
        stats = torch.cat([h64.sum(0), (h64 * h64).sum(0), count])
        dist.all_reduce(stats, group=group)
        n_out = h.shape[1]
        n = stats[2 * n_out:]
        mean64 = stats[:n_out] / n
        var64 = (stats[n_out:2 * n_out] / n - mean64 * mean64).clamp_min(0)
        mean, var = mean64.to(acc), var64.to(acc)
        rstd = torch.rsqrt(var + eps)
        R.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var64, n,
                               momentum)
        y = R.bn_act_dropout(h, mean, rstd, bn_weight, bn_bias, activation, negative_slope, p,
                             seed, offset).to(x.dtype)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, h, mean, rstd, n, seed, offset)
        ctx.hyper = (activation, negative_slope, p, group, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph: these formulas hold no graph
            raise RuntimeError("LinearBNAct with synchronized BN statistics cannot be "
                               "differentiated twice (gradient penalty); use local "
                               "statistics (convert_sync_batchnorm(model, enabled=False))")
        x, weight, bn_weight, bn_bias, h, mean, rstd, n, seed, offset = ctx.saved_tensors
        activation, negative_slope, p, group, has_bias = ctx.hyper
        dz, xhat = R.bn_act_dropout_backward(grad_y, h, mean, rstd, bn_weight, bn_bias,
                                             activation, negative_slope, p, seed, offset)
        dbeta = dz.sum(0)
        dgamma = (dz * xhat).sum(0)
        sums = torch.cat([dbeta, dgamma])
        dist.all_reduce(sums, group=group)
        n_out = dz.shape[1]
        total = n.to(mean.dtype)
        mean_dz, mean_dz_xhat = sums[:n_out] / total, sums[n_out:] / total
        dh = (bn_weight * rstd * (dz - mean_dz - xhat * mean_dz_xhat)).to(x.dtype)
        need_dx = ctx.needs_input_grad[0]
        dx, dw, db = R.linear_backward(dh, x, weight, need_dx)
        return (dx if need_dx else None, dw, db if has_bias else None, dgamma,
                dbeta) + (None,) * 11

"""Multi-process training: 2 CPU processes on gloo (torch.multiprocessing spawn
and torchrun subprocesses, every one under a timeout), and GPU-marked checks
for bench/gpu_check.sh."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastgan
from fastgan import distributed as fdist
from fastgan.nn import LinearAct, LinearBNAct, seed_dropout

ROOT = Path(__file__).resolve().parents[2]
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
B, STEPS = 5, 5            # per-rank batch (odd on purpose) and optimizer steps
SPAWN_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, nprocs: int, *args):
    """Run fn(rank, *args) in nprocs processes; fail (never hang) past the timeout."""
    port = _free_port()
    ctx = mp.start_processes(fn, args=(nprocs, port, *args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{nprocs} processes still running after {SPAWN_TIMEOUT_S} s")


def _join_group(rank: int, world: int, port: int) -> fdist.Context:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return fdist.init("cpu")


# ----------------------------------------------------------------------------- model, data
def _model(dropout=0.0) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        LinearBNAct(6, 9, eps=0.8, momentum=None, dropout=dropout),   # the GAN-code eps
        LinearBNAct(9, 7, momentum=0.3, activation="relu", dropout=dropout),
        LinearAct(7, 3, activation="tanh"))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 2 * B, 6, generator=g), torch.randn(STEPS, 2 * B, 3, generator=g)


def _train(model, xs, ts, backend_name, rows=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for x, t in zip(xs, ts):
        with fastgan.use_backend(backend_name):
            loss = (model(x[rows]) - t[rows]).square().mean()
            opt.zero_grad()
            loss.backward()
        opt.step()


def _sync_worker(rank, world, port, out_dir):
    ctx = _join_group(rank, world, port)
    xs, ts = _data()
    for backend_name in CPU_BACKENDS:
        model = fdist.convert_sync_batchnorm(_model())
        ddp = fdist.wrap(model, ctx)
        fastgan.backend.calls.clear()
        _train(ddp, xs, ts, backend_name, slice(rank * B, (rank + 1) * B))
        torch.save({"state": model.state_dict(), "calls": dict(fastgan.backend.calls)},
                   Path(out_dir) / f"{backend_name}_rank{rank}.pt")
    # Dropout on: the mask is the op's Philox mask for this layer's (seed, offset).
    layer = fdist.convert_sync_batchnorm(LinearBNAct(6, 9, dropout=0.5))
    seed_dropout(layer, 77 + rank)
    seed, offset = layer.dropout_rng[:1].clone(), layer.dropout_rng[1:].clone()
    x = xs[0][rank * B:(rank + 1) * B]
    y = layer(x)
    h = torch.nn.functional.linear(xs[0], layer[0].weight, layer[0].bias)  # the global batch
    var, mean = torch.var_mean(h, dim=0, correction=0)
    with fastgan.use_backend("reference"):
        expect, *_ = torch.ops.fastgan.linear_bn_act(
            x, layer[0].weight, layer[0].bias, layer[1].weight, layer[1].bias, mean, var,
            torch.zeros(1, dtype=torch.int64), False, 0.1, layer[1].eps, "leaky_relu", 0.2,
            0.5, seed, offset)
    torch.save({"y": y.detach(), "expect": expect}, Path(out_dir) / f"dropout_rank{rank}.pt")
    fdist.shutdown()


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    _spawn(_sync_worker, 2, str(out))
    return out


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_sync_stats_two_ranks_equal_one_process_double_batch(sync_run, backend_name):
    xs, ts = _data()
    single = _model()
    _train(single, xs, ts, backend_name)  # 1 process, batch 2B, local statistics
    expect = single.state_dict()
    ranks = [torch.load(sync_run / f"{backend_name}_rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        # The sync path ran: the fused BN op never did in training, the Linear+act op did.
        assert r["calls"].get((backend_name, "linear_act_forward"), 0) == STEPS
        assert r["calls"].get((backend_name, "linear_bn_act_forward"), 0) == 0
        for k, v in expect.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert int(ranks[0]["state"]["0.1.num_batches_tracked"]) == STEPS


def test_sync_stats_dropout_uses_the_op_mask(sync_run):
    for r in (0, 1):
        got = torch.load(sync_run / f"dropout_rank{r}.pt")
        assert (got["y"] == 0).any() and (got["y"] != 0).any()
        torch.testing.assert_close(got["y"], got["expect"], rtol=1e-5, atol=1e-6)
    a, b = (torch.load(sync_run / f"dropout_rank{r}.pt")["y"] for r in (0, 1))
    assert not torch.equal(a == 0, b == 0)  # per-rank seeds: different masks


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group in this process (SyncStats stays inactive for it,
    so the tests call the autograd Function directly)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,p,momentum", [(2, 0.0, 0.1), (3, 0.4, None), (7, 0.2, 0.5)])
def test_sync_function_equals_the_op_on_one_rank(one_rank_group, dtype, batch, p, momentum):
    """On one rank the global batch is the local one: the sync path must match
    the fused op (reference backend): output, mask, gradients, running stats."""
    torch.manual_seed(0)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(batch, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(11, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(11, dtype=dtype, requires_grad=True)
    gamma = (torch.rand(11, dtype=stat) + 0.5).requires_grad_()
    beta = torch.randn(11, dtype=stat, requires_grad=True)
    seed, offset = torch.tensor([1234]), torch.tensor([5])
    grad = torch.randn(batch, 11, dtype=dtype)
    rm0, rv0 = torch.randn(11, dtype=stat), torch.rand(11, dtype=stat) + 0.5
    fastgan.backend.calls.clear()
    results = []
    for path in ("op", "sync"):
        rm, rv, nbt = rm0.clone(), rv0.clone(), torch.tensor([3])
        args = (x, w, b, gamma, beta, rm, rv, nbt)
        hyper = (momentum, 0.8, "leaky_relu", 0.2, p, seed, offset)
        with fastgan.use_backend("reference"):
            if path == "op":
                y = fastgan.functional.linear_bn_act(*args, True, *hyper[:4], p, seed, offset)
            else:
                y = fdist.SyncLinearBNActFunction.apply(*args, *hyper, None)
            y.backward(grad)
        results.append([y.detach(), rm, rv, nbt] + [t.grad.clone() for t in (x, w, b, gamma,
                                                                               beta)])
        for t in (x, w, b, gamma, beta):
            t.grad = None
    assert fastgan.backend.calls[("reference", "linear_bn_act_backward")] == 1
    # The sync path runs the reference's own epilogue, mask and activation
    # backward (fp64 slope for fp64 inputs); only its statistics (all-reduced
    # sums, not var_mean) and its dh formula round differently.
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    names = ["y", "running_mean", "running_var", "num_batches_tracked", "dx", "dW", "db",
             "dgamma", "dbeta"]
    for name, a, s in zip(names, *results):
        torch.testing.assert_close(s, a, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    if p:
        assert torch.equal(results[0][0] == 0, results[1][0] == 0)  # the same Philox mask


def test_sync_function_gradcheck(one_rank_group):
    torch.manual_seed(0)
    args = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True),
            torch.rand(5, dtype=torch.float64, requires_grad=True),
            torch.randn(5, dtype=torch.float64, requires_grad=True)]

    def f(*a):
        return fdist.SyncLinearBNActFunction.apply(
            *a, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64),
            torch.zeros(1, dtype=torch.int64), 0.1, 1e-3, "tanh", 0.0, 0.3,
            torch.tensor([9]), torch.tensor([0]), None)
    assert torch.autograd.gradcheck(f, args)


def test_sync_stats_inactive_in_one_process():
    layer = fdist.convert_sync_batchnorm(LinearBNAct(4, 5))
    assert not layer.sync_stats.active()
    fastgan.backend.calls.clear()
    with fastgan.use_backend("reference"):
        layer(torch.randn(3, 4))
    assert fastgan.backend.calls[("reference", "linear_bn_act_forward")] == 1
    fdist.convert_sync_batchnorm(layer, enabled=False)
    assert layer.sync_stats is None


def test_context_shard_and_seeds():
    one = fdist.Context()
    data = torch.arange(11)
    assert torch.equal(one.shard(data), data) and one.seed(5, 1) == 5
    parts = [fdist.Context(rank=r, world_size=2).shard(data) for r in (0, 1)]
    assert [p.tolist() for p in parts] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    seeds = {fdist.Context(rank=r, world_size=2).seed(5, 1) for r in (0, 1)}
    assert len(seeds) == 2
    with pytest.raises(ValueError, match="data"):
        fdist.Context(rank=0, world_size=4).shard(torch.arange(3))


# ----------------------------------------------------------------------------- failing peers
def _agree_worker(rank, world, port, out_dir):
    """agree() takes the maximum over ranks; a rank that stalls past the
    timeout fails the other's next collective with an error is_comm_error knows."""
    import datetime
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ctx = fdist.init("cpu", timeout=datetime.timedelta(seconds=2))
    got = fdist.agree(ctx, rank * 5, 3 - rank, 0)
    if rank == 1:
        time.sleep(6)        # alive, but in no collective
        result = {"agree": got}
    else:
        t0 = time.monotonic()
        try:
            fdist.agree(ctx, 1)
            result = {"agree": got, "error": None}
        except RuntimeError as e:
            result = {"agree": got, "error": str(e), "comm": fdist.is_comm_error(e),
                      "seconds": time.monotonic() - t0}
    torch.save(result, Path(out_dir) / f"agree{rank}.pt")
    fdist.shutdown()


def test_agree_and_collective_timeout(tmp_path):
    _spawn(_agree_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"agree{r}.pt") for r in (0, 1))
    assert r0["agree"] == r1["agree"] == [5, 3, 0]
    assert r0["error"] is not None and r0["comm"] and 1.5 < r0["seconds"] < 5.5, r0


def test_agree_in_one_process_is_the_values():
    assert fdist.agree(fdist.Context(), 2, True, 0) == [2, 1, 0]


def test_is_comm_error():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
                        "closed by peer [127.0.0.1]:49369")
    assert fdist.is_comm_error(gloo)
    assert fdist.is_comm_error(RuntimeError("Timed out waiting 3000ms for recv operation"))
    assert not fdist.is_comm_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not fdist.is_comm_error(ValueError("gloo"))


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_init_sets_a_collective_timeout(monkeypatch, device, backend):
    """gloo and NCCL alike: a dead peer ends the run in COLLECTIVE_TIMEOUT_S, not
    PyTorch's default (30 minutes for gloo). NCCL without a GPU: the calls faked."""
    import datetime
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(fdist.dist, "is_initialized", lambda: bool(seen))
    monkeypatch.setattr(fdist.dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(fdist.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(fdist.dist, "get_world_size", lambda: 2)
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    ctx = fdist.init(device)
    assert seen["backend"] == backend and ctx.world_size == 2
    assert seen["timeout"] == datetime.timedelta(seconds=fdist.COLLECTIVE_TIMEOUT_S) <= \
        datetime.timedelta(minutes=1)
    seen.clear()
    fdist.init(device, timeout=datetime.timedelta(seconds=7))
    assert seen["timeout"] == datetime.timedelta(seconds=7)


# ----------------------------------------------------------------------------- torchrun
def _torchrun(args, timeout=120, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=kw.get("cwd", ROOT))


def test_failing_rank_fails_the_run_without_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from fastgan import distributed as fdist\n"
        "ctx = fdist.init('cpu')\n"
        "if ctx.rank == 1:\n"
        "    raise RuntimeError('rank 1 fails on purpose')\n"
        "dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone\n")
    t0 = time.monotonic()
    res = _torchrun([str(script)], timeout=100)
    assert res.returncode != 0
    assert "rank 1 fails on purpose" in res.stdout + res.stderr
    assert time.monotonic() - t0 < 100


_TRAIN_FLAGS = ["--data", "synthetic", "--batch-size", "8", "--g-hidden", "16,24", "--d-hidden",
                "24,16", "--latent-dim", "8", "--device", "cpu", "--no-progress", "--log-every",
                "2"]


def test_torchrun_train_checkpoint_one_process_and_back(tmp_path):
    """2 ranks train and checkpoint (rank 0 writes); the checkpoint resumes in
    one process; that one's checkpoint resumes on 2 ranks again."""
    from fastgan import checkpoint, data
    from fastgan.train import Trainer, TrainConfig
    out = tmp_path / "run"
    res = _torchrun(["-m", "fastgan", "train", *_TRAIN_FLAGS, "--steps", "4", "--sync-bn",
                     "--out", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    assert "2 processes (DDP)" in res.stdout
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["steps"] == 4 and state["config"]["sync_bn"] is True
    noise = [r["noise"] for r in state["rng_ranks"]]
    assert len(noise) == 2 and not torch.equal(noise[0], noise[1])  # per-rank streams
    assert all(k.startswith("net.") for k in state["generator"])     # no DDP "module." prefix

    # One process: loads the 2-rank checkpoint, trains on, writes its own.
    ds = data.synthetic()
    trainer = Trainer(TrainConfig.from_dict(state["config"]), ds.images, "cpu",
                      data_id=state["data"])
    trainer.load_state_dict(state)
    for k, v in state["generator"].items():
        assert torch.equal(trainer.G.state_dict()[k], v), k
    for _ in range(2):
        trainer.train_step()
    checkpoint.save(trainer.state_dict(), out / "checkpoint.pt")

    # And back on 2 ranks.
    res = _torchrun(["-m", "fastgan", "train", "--resume", "--data", "synthetic", "--device",
                     "cpu", "--no-progress", "--steps", "8", "--out", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["steps"] == 8 and len(state["rng_ranks"]) == 2


def test_reference_loop_refused_on_several_ranks():
    from fastgan.train import ConfigError, Trainer, TrainConfig
    cfg = TrainConfig(latent_dim=4, g_hidden=(8,), d_hidden=(8,), reference=True, batch_size=4)
    with pytest.raises(ConfigError, match="one process"):
        Trainer(cfg, torch.zeros(16, 784), dist=fdist.Context(rank=0, world_size=2))


# ----------------------------------------------------------------------------- GPU
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_nccl_sync_stats_and_graph_capture(tmp_path):
    script = tmp_path / "nccl.py"
    script.write_text(_NCCL_SCRIPT)
    res = _torchrun([str(script)], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nccl ok" in res.stdout
    # The CLI on 2 GPUs: DDP, synchronized statistics, CUDA graphs.
    res = _torchrun(["-m", "fastgan", "train", "--data", "synthetic", "--steps", "30",
                     "--sync-bn", "--no-progress", "--log-every", "10", "--out",
                     str(tmp_path / "run")], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CUDA graph, 2 processes (DDP)" in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_one_rank_nccl_graph_capture_matches_eager(tmp_path):
    """One GPU: the sync path's NCCL all-reduces inside a DDP step captured in a
    CUDA graph (side-stream DDP, GRAPH_WARMUP eager steps) give the same weights
    as the plain eager model after the same number of steps (dropout on)."""
    script = tmp_path / "nccl1.py"
    script.write_text(_NCCL1_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "1", str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "graph == eager" in res.stdout


_NCCL1_SCRIPT = """
import copy, dataclasses
import torch, torch.distributed as dist
from fastgan import distributed as fdist
from fastgan.nn import LinearAct, LinearBNAct, seed_dropout
from fastgan.train.graphs import capture
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
torch.manual_seed(0)
plain = torch.nn.Sequential(LinearBNAct(16, 33, dropout=0.2), LinearAct(33, 8, activation="tanh"))
seed_dropout(plain, 5)
plain = plain.to(dev)
synced = fdist.convert_sync_batchnorm(copy.deepcopy(plain))
for m in synced:
    if isinstance(m, LinearBNAct):
        m.sync_stats.active = lambda: True   # one rank: force the all-reduce path
ctx = fdist.Context(rank=0, world_size=1, device=dev)
ddp = fdist.wrap(synced, dataclasses.replace(ctx, world_size=2))  # DDP over the 1-rank group
assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
x = torch.randn(64, 16, device=dev)
def make_step(model, params):
    opt = torch.optim.SGD(params, lr=0.05)
    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return step, opt
step, opt = make_step(ddp, synced.parameters())
graph = capture(step, warmup=fdist.GRAPH_WARMUP,
                after_warmup=lambda: opt.zero_grad(set_to_none=True))
for _ in range(3):
    graph.replay()
eager, _ = make_step(plain, plain.parameters())
for _ in range(fdist.GRAPH_WARMUP + 3):
    eager()
torch.cuda.synchronize()
a, b = synced.state_dict(), plain.state_dict()
for k in a:
    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
print("graph == eager")
dist.destroy_process_group()
"""


_NCCL_SCRIPT = """
import torch
import fastgan
from fastgan import distributed as fdist
from fastgan.nn import LinearAct, LinearBNAct
from fastgan.train.graphs import capture
ctx = fdist.init()
assert ctx.device.type == "cuda"
torch.manual_seed(0)
model = torch.nn.Sequential(LinearBNAct(16, 32), LinearAct(32, 8, activation="tanh")).cuda()
fdist.convert_sync_batchnorm(model)
ddp = fdist.wrap(model, ctx)
opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
x = torch.randn(64, 16, device=ctx.device)
def step():
    opt.zero_grad(set_to_none=True)
    ddp(x).square().mean().backward()
    opt.step()
graph = capture(step, warmup=fdist.GRAPH_WARMUP,
                after_warmup=lambda: opt.zero_grad(set_to_none=True))
for _ in range(3):
    graph.replay()
torch.cuda.synchronize()
stats = [m[1].running_mean.clone() for m in model if isinstance(m, LinearBNAct)]
gathered = ctx.gather([s.cpu() for s in stats])
assert all(torch.allclose(a, b) for a, b in zip(gathered[0], gathered[1]))
if ctx.is_main:
    print("nccl ok")
fdist.shutdown()
"""

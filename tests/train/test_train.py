"""The training engine: D gets no gradient from the G step, resumes bit for bit,
restores its warm-up state, runs its CUDA-graph path on CPU stand-ins; on a GPU
the CUDA graph equals eager (both schedules). Its equivalence with the
plain-PyTorch loop is in test_schedule.py."""
import copy

import pytest
import torch

from fastgan import nn as fnn
from fastgan.train import (ConfigError, GANStep, ResidentBatches, TrainConfig,
                           Trainer, build_models, make_adam)
from fastgan.train.config import SCHEDULES

SMALL = dict(latent_dim=8, g_hidden=(32, 64), d_hidden=(64, 32), image_dim=48, batch_size=16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(n=64, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 2 - 1


def _tensors(state, prefix=""):
    """Flatten nested dicts/lists of a state_dict into {path: tensor-or-value}."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensors(v, f"{prefix}{k}/"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensors(v, f"{prefix}{i}/"))
    else:
        out[prefix] = state
    return out


def assert_states_equal(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if torch.is_tensor(ta[k]):
            assert torch.equal(ta[k], tb[k]), k
        else:
            assert ta[k] == tb[k], k


# ------------------------------------------------------------------ equivalence
# The engine against the plain-PyTorch loop, for each schedule: test_schedule.py.
def test_g_step_gives_discriminator_no_gradient():
    """D's .grad after a step is exactly what D's Adam used: the G loss's
    backward through D adds nothing to it, and D trains again afterwards."""
    tr = Trainer(TrainConfig(**SMALL), _data())
    used = {}
    tr.d_opt.register_step_pre_hook(
        lambda opt, args, kw: used.update({id(p): p.grad.clone() for p in tr.D.parameters()}))
    for _ in range(2):
        tr.train_step()
        for p in tr.D.parameters():
            assert p.requires_grad
            assert torch.equal(p.grad, used[id(p)])
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.G.parameters())


# ------------------------------------------------------------------ determinism, resume
def _run(cfg, steps, data, start=None):
    tr = Trainer(cfg, data)
    if start is not None:
        tr.load_state_dict(start)
    while tr.steps < steps:
        tr.train_step()
    return tr


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("reference", [False, True], ids=["engine", "reference"])
def test_resume_equals_uninterrupted(tmp_path, reference, schedule):
    """Stop after 5 steps (mid-epoch, 4 steps an epoch), checkpoint through a file,
    resume to 11: bit-identical to 11 uninterrupted steps. Dropout is on, so
    the dropout streams, noise, data order and optimizer state all matter."""
    from fastgan import checkpoint
    cfg = TrainConfig(**SMALL, dropout=0.2, reference=reference, schedule=schedule)
    data = _data()
    straight = _run(cfg, 11, data)
    first = _run(cfg, 5, data)
    checkpoint.save(first.state_dict(), tmp_path / "c.pt")
    del first
    torch.manual_seed(1234)  # the resumed process's global RNG starts elsewhere
    resumed = _run(cfg, 11, data, start=checkpoint.load(tmp_path / "c.pt"))
    assert_states_equal(straight.state_dict(), resumed.state_dict())
    assert torch.equal(straight.sample(straight.fixed_noise(4)), resumed.sample(resumed.fixed_noise(4)))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_several_steps_per_call_equal_single_steps(schedule):
    """steps_per_call=2 (one graph of two steps on CUDA) is the same training."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
    data = _data()
    one = _run(cfg, 8, data)
    two = Trainer(cfg, data, steps_per_call=2)
    while two.steps < 8:
        two.train_step()
    assert two.step.count == 8 and two.steps == 8
    assert_states_equal(one.state_dict(), two.state_dict())
    with pytest.raises(ConfigError, match="steps_per_call 3 must divide the 4 steps"):
        Trainer(cfg, data, steps_per_call=3)


def test_seed_changes_everything_and_run_is_reproducible():
    data = _data()
    a = _run(TrainConfig(**SMALL, seed=1), 3, data)
    b = _run(TrainConfig(**SMALL, seed=1), 3, data)
    c = _run(TrainConfig(**SMALL, seed=2), 3, data)
    assert_states_equal(a.state_dict(), b.state_dict())
    assert not torch.equal(a.G.net[0][0].weight, c.G.net[0][0].weight)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snapshot_restore_undoes_warmup(schedule):
    """The CUDA-graph warm-up restore, exercised on the CPU: snapshot a fresh
    step (empty Adam state), run 3 steps, restore, then run 4 steps: equal to 4
    steps of an untouched twin, bit for bit (BN stats, counters, Adam, noise)."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
    data = _data()
    a, b = Trainer(cfg, data), Trainer(cfg, data)
    a.batches.start_epoch(0)
    snap = a.step._snapshot()
    for _ in range(3):
        a.step()
    a.step._restore(snap)
    a.step.count = 0
    a._loaded_epoch = 0
    for _ in range(4):
        a.train_step(), b.train_step()
    sa, sb = a.state_dict(), b.state_dict()
    assert_states_equal(sa, sb)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture runs the body once
    (a real capture only records it), replay runs it again and, like a real
    replay, leaves its results in the captured output tensors."""
    step = None

    def __init__(self):
        self.generators = []

    def register_generator_state(self, gen):
        self.generators.append(gen)

    def replay(self):
        for static, new in zip(_FakeGraph.step._graph.outputs, _FakeGraph.step._body()):
            static.copy_(new)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls of fastgan.train.graphs.capture replaced by CPU stand-ins
    (streams that do nothing, a capture that just runs its body)."""
    import contextlib
    from types import SimpleNamespace
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())


def test_capture_order_and_errors(fake_cuda):
    """capture: warm-up calls, then after_warmup, then the captured call; the
    generators are registered; a failed capture is one GraphCaptureError."""
    import fastgan.train.step
    from fastgan.train.graphs import GraphCaptureError, capture
    assert fastgan.train.GraphCaptureError is GraphCaptureError
    assert fastgan.train.step.GraphCaptureError is GraphCaptureError
    log, gen = [], torch.Generator()

    def fn():
        log.append("call")
        return torch.ones(1)

    g = capture(fn, warmup=2, generators=(gen,), after_warmup=lambda: log.append("restore"),
                device="cpu")
    assert log == ["call", "call", "restore", "call"]
    assert g.graph.generators == [gen] and torch.equal(g.outputs, torch.ones(1))

    calls = []

    def not_capturable():
        calls.append(1)
        if len(calls) > 1:  # fails in the capture, not in the warm-up
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    with pytest.raises(GraphCaptureError, match="not_capturable.*not permitted") as e:
        capture(not_capturable, warmup=1, device="cpu")
    assert "\n" not in str(e.value) and isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("host_batches", [False, True], ids=["resident", "host"])
def test_graph_code_path_on_cpu(fake_cuda, host_batches, schedule):
    """GANStep's capture path (warm-up, restore, capture, replay) with the CUDA
    calls replaced by CPU stand-ins: after n calls it has run n + 1 steps (the
    stand-in capture executes once), bit-identical to an eager run of n + 1."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
    data = _data(n=160)
    graphed, eager = Trainer(cfg, data), Trainer(cfg, data)
    graphed.step.graphs = True
    _FakeGraph.step = graphed.step
    graphed.batches.start_epoch(0)
    eager.batches.start_epoch(0)
    for i in range(4):
        real = data[16 * i: 16 * (i + 1)] if host_batches else None
        out = graphed.step(real)
        if i == 0:  # the stand-in capture ran one step on the first batch
            eager.step(real)
        ref = eager.step(real)
        assert torch.equal(torch.stack(out), torch.stack(ref))
    assert graphed.step.count == 4 and isinstance(graphed.step._graph.graph, _FakeGraph)
    assert graphed.step._graph.graph.generators == [graphed.step.noise]
    assert_states_equal(graphed.state_dict(), eager.state_dict())
    with pytest.raises(ValueError, match="on every call or on none"):
        graphed.step(None if host_batches else data[:16])


def test_read_means_averages_since_last_read():
    tr = Trainer(TrainConfig(**SMALL), _data())
    stats = [torch.stack(tr.train_step()).clone() for _ in range(3)]
    means = tr.step.read_means()
    torch.testing.assert_close(torch.tensor(list(means.values())), torch.stack(stats).mean(0))
    assert tr.step.read_means()["d_loss"] == 0.0


def test_resident_batches_cover_each_epoch_once():
    data = torch.arange(20.0).repeat_interleave(3).reshape(20, 3)
    rb = ResidentBatches(data, 6, seed=5)
    assert rb.steps_per_epoch == 3
    rb.start_epoch(0)
    seen = torch.cat([rb.next()[:, 0] for _ in range(3)])
    assert len(set(seen.tolist())) == 18                      # no repeats; 2 dropped
    rb.start_epoch(0, step=1)                                 # resume mid-epoch
    assert torch.equal(rb.next()[:, 0], seen[6:12])
    assert not torch.equal(rb.order(0), rb.order(1))
    assert torch.equal(rb.order(1), ResidentBatches(data, 6, seed=5).order(1))


def test_config_errors():
    data = _data(n=10)
    with pytest.raises(ConfigError, match="batch_size 16 is larger than the dataset"):
        Trainer(TrainConfig(**SMALL), data)
    with pytest.raises(ConfigError, match="graphs=True needs a CUDA device"):
        Trainer(TrainConfig(**SMALL), _data(), graphs=True)
    with pytest.raises(ConfigError, match="images of 48 values"):
        Trainer(TrainConfig(**SMALL), torch.zeros(64, 50))
    tr = Trainer(TrainConfig(**SMALL), _data())
    other = Trainer(TrainConfig(**{**SMALL, "g_hidden": (32, 32)}), _data())
    with pytest.raises(ConfigError, match="g_hidden"):
        tr.load_state_dict(other.state_dict())
    st = tr.state_dict()
    st["generator"] = other.G.state_dict()  # a config that lies about its weights
    with pytest.raises(ConfigError, match="do not fit the model"):
        tr.load_state_dict(st)


def test_state_dict_loads_with_weights_only(tmp_path):
    tr = Trainer(TrainConfig(**SMALL), _data())
    tr.train_step()
    torch.save(tr.state_dict(), tmp_path / "c.pt")
    st = torch.load(tmp_path / "c.pt", weights_only=True)
    assert st["steps"] == 1 and st["config"]["g_hidden"] == [32, 64]


# ------------------------------------------------------------------ GPU
def _gpu_pair(cfg, data, graphs_a, graphs_b):
    a = Trainer(cfg, data, "cuda", graphs=graphs_a)
    b = Trainer(cfg, data, "cuda", graphs=graphs_b)
    return a, b


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_graph_equals_eager(schedule):
    """Graph replay vs the same step run eagerly, dropout on: same losses and
    parameters (fp32 tolerance), identical BN counters and dropout counters, so
    the warm-up left no trace and replays drew fresh noise and masks."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
    data = _data()
    g, e = _gpu_pair(cfg, data, True, False)
    losses = []
    for _ in range(10):
        sg, se = g.train_step(), e.train_step()
        torch.testing.assert_close(torch.stack(sg), torch.stack(se), rtol=1e-4, atol=1e-5)
        losses.append(torch.stack(sg).clone())
    assert g.step._graph is not None and e.step._graph is None
    assert not torch.equal(losses[0], losses[1])  # fresh noise/batches each replay
    for (k, a), b in zip(g.G.state_dict().items(), e.G.state_dict().values()):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert [t.tolist() for t in fnn.dropout_rng_state(g.G)] == \
        [t.tolist() for t in fnn.dropout_rng_state(e.G)]
    assert g.step.g_opt.state[next(g.G.parameters())]["step"].item() == 10


@pytest.mark.gpu
@cuda
def test_cuda_graph_resume_equals_uninterrupted(tmp_path):
    from fastgan import checkpoint
    cfg = TrainConfig(**SMALL, dropout=0.2)
    data = _data()
    straight = Trainer(cfg, data, "cuda")
    for _ in range(11):
        straight.train_step()
    first = Trainer(cfg, data, "cuda")
    for _ in range(5):
        first.train_step()
    checkpoint.save(first.state_dict(), tmp_path / "c.pt")
    resumed = Trainer(cfg, data, "cuda")
    resumed.load_state_dict(checkpoint.load(tmp_path / "c.pt"))
    while resumed.steps < 11:
        resumed.train_step()
    for (k, a), b in zip(straight.G.state_dict().items(), resumed.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_graph_of_several_steps_equals_eager(schedule):
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
    data = _data()
    g = Trainer(cfg, data, "cuda", graphs=True, steps_per_call=2)
    e = Trainer(cfg, data, "cuda", graphs=False)
    for _ in range(4):
        g.train_step()
    for _ in range(8):
        e.train_step()
    assert g.steps == e.steps == 8
    for (k, a), b in zip(g.D.state_dict().items(), e.D.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert [t.tolist() for t in fnn.dropout_rng_state(g.G)] == \
        [t.tolist() for t in fnn.dropout_rng_state(e.G)]


@pytest.mark.gpu
@cuda
def test_cuda_graph_with_host_batches():
    """step(real) copies into the graph's static buffer."""
    cfg = TrainConfig(**SMALL, dropout=0.0)
    G, D = build_models(cfg)
    G, D = G.cuda(), D.cuda()
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    kw = dict(batch_size=16, latent_dim=8, seed=0)
    g = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()), **kw)
    e = GANStep(G2, D2, make_adam(G2.parameters()), make_adam(D2.parameters()), graphs=False, **kw)
    data = _data().cuda()
    for i in range(4):
        real = data[16 * i: 16 * (i + 1)]
        torch.testing.assert_close(torch.stack(g(real)), torch.stack(e(real)), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_capture_on_the_gpu_draws_fresh_noise():
    """fastgan.train.graphs.capture on a real GPU: replays rerun the captured
    call into the same output tensor, with fresh draws from the registered
    generator."""
    from fastgan.train.graphs import capture
    gen = torch.Generator("cuda").manual_seed(0)
    acc = torch.zeros(4, device="cuda")

    def fn():
        acc.add_(1)
        return torch.randn(4, generator=gen, device="cuda") + acc

    g = capture(fn, warmup=2, generators=(gen,), after_warmup=acc.zero_)
    assert acc.sum().item() == 0  # reset after the warm-up; a capture only records
    first = g.replay().clone()
    second = g.replay()
    assert second is g.outputs and acc.tolist() == [2.0] * 4
    assert not torch.allclose(first - 1, second - 2)  # fresh noise each replay

"""The two train-step schedules and the seed GAN's preset: the engine equals the
plain-PyTorch ReferenceStep for each schedule (dropout on and off), the
simultaneous step's one-sweep backward (ghost rows, GhostRows) equals two
backward passes, its GEMM FLOPs are the documented count, DDP on 2 gloo ranks, and
`fastgan train --preset seed` end to end."""
import copy
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import CASES, ran, require

import fastgan
from fastgan import backend
from fastgan.cli import main
from fastgan.nn.models import Discriminator, Generator, keras_init_
from fastgan.tools import benchmark as B
from fastgan.train import (ConfigError, GANStep, ReferenceStep, ResidentBatches, TrainConfig,
                           Trainer, build_models, make_adam)
from fastgan.train.config import PRESETS, SCHEDULES, preset

SMALL = dict(latent_dim=8, g_hidden=(32, 64), d_hidden=(64, 32), image_dim=48, batch_size=16)
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
STEPS = 6


def _data(n=160, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 2 - 1


def _pair(schedule, cfg, ref_models, data):
    """The engine on cfg's fused models and ReferenceStep on ``ref_models``,
    same weights, same noise and batches."""
    G, D = build_models(cfg)
    G0, D0 = ref_models
    G0.load_state_dict(G.state_dict())
    D0.load_state_dict(D.state_dict())
    kw = dict(batch_size=16, latent_dim=8, seed=3, schedule=schedule)
    engine = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()),
                     batches=ResidentBatches(data, 16, seed=1), **kw)
    ref = ReferenceStep(G0, D0, torch.optim.Adam(G0.parameters(), 2e-4, (0.5, 0.999)),
                        torch.optim.Adam(D0.parameters(), 2e-4, (0.5, 0.999)),
                        batches=ResidentBatches(data, 16, seed=1), **kw)
    engine.batches.start_epoch(0)
    ref.batches.start_epoch(0)
    return engine, ref


def _assert_models_close(cfg, engine, ref, steps):
    # A Linear bias in front of BatchNorm has zero true gradient (BN subtracts
    # the mean), so its computed gradient is round-off noise that Adam
    # normalises into steps of up to lr: those biases (and the running means
    # that include them) may drift apart by up to steps * lr. Everything else
    # agrees to fp32 round-off.
    pre_bn = {f"net.{i}.0.bias" for i in range(len(cfg.g_hidden))} | \
        {f"net.{i}.1.running_mean" for i in range(len(cfg.g_hidden))}
    for model, ref_model in ((engine.G, ref.G), (engine.D, ref.D)):
        ref_state = ref_model.state_dict()
        for k, a in model.state_dict().items():
            atol = steps * cfg.lr if (model is engine.G and k in pre_bn) else 1e-6
            torch.testing.assert_close(a, ref_state[k], rtol=1e-5, atol=atol, msg=k)


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_engine_equals_reference_step_dropout_on(name, schedule):
    """Dropout 0.2: the engine (fused Adam; simultaneous: the one-sweep backward)
    against ReferenceStep's plain autograd (alternating: two backward passes;
    simultaneous: autograd.grad of each loss) driving copies of the same fused
    modules, so both see the same Philox masks. Same stats every step, same
    weights and BN statistics after several Adam steps."""
    cfg = TrainConfig(**SMALL, dropout=0.2)
    engine, ref = _pair(schedule, cfg, build_models(cfg), _data())
    functions = ("linear_act_forward", "linear_bn_act_backward")
    with ran(name, *functions):
        before = backend.calls[(name, "linear_act_backward")]
        for _ in range(STEPS):
            s1 = engine()
            after_engine = backend.calls[(name, "linear_act_backward")]
            s0 = ref()
            torch.testing.assert_close(torch.stack(s1), torch.stack(s0), rtol=1e-5, atol=1e-6)
            # Two backward kernels per D layer (alternating: the D step's and the
            # G step's; simultaneous: the x rows' and the ghost rows'), plus G's
            # tanh head.
            d_layers = len(cfg.d_hidden) + 1
            assert after_engine - before == 2 * d_layers + 1
            before = backend.calls[(name, "linear_act_backward")]
    _assert_models_close(cfg, engine, ref, STEPS)
    assert [t.tolist() for t in fastgan.nn.dropout_rng_state(engine.D)] == \
        [t.tolist() for t in fastgan.nn.dropout_rng_state(ref.D)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_engine_equals_plain_pytorch_models_dropout_off(name, schedule):
    """The fused engine (fused Adam, real and fake through D as one batch)
    against ReferenceStep on the plain nn models (nn.Linear, nn.BatchNorm1d,
    F.binary_cross_entropy_with_logits, torch.optim.Adam), dropout off: the same
    stats every step, parameters and BN statistics after 10 steps to fp32
    tolerance; the backend ran every fused layer of every step."""
    cfg = TrainConfig(**SMALL, dropout=0.0)
    plain = build_models(TrainConfig(**SMALL, dropout=0.0, reference=True))
    engine, ref = _pair(schedule, cfg, plain, _data())
    steps = 10
    backend.calls.clear()
    with fastgan.use_backend(name):
        for _ in range(steps):
            torch.testing.assert_close(torch.stack(engine()), torch.stack(ref()), rtol=1e-5,
                                       atol=1e-6)
    assert backend.calls[(name, "linear_bn_act_backward")] == steps * len(cfg.g_hidden)
    assert backend.calls[(name, "gan_bce_forward")] == 2 * steps
    _assert_models_close(cfg, engine, ref, steps)


def test_schedules_differ_and_simultaneous_g_sees_the_old_d():
    """After the same first step the two schedules have different G weights
    (alternating's G gradient goes through the updated D); D's weights agree
    (both D steps are the same), and G's simultaneous gradient is the one
    through D as it was before its update."""
    cfg = TrainConfig(**SMALL, dropout=0.0)
    data = _data()
    a, s = Trainer(cfg, data), Trainer(TrainConfig(**SMALL, dropout=0.0,
                                                   schedule="simultaneous"), data)
    d_before = copy.deepcopy(s.D)
    grads = {}
    s.g_opt.register_step_pre_hook(
        lambda opt, args, kw: grads.update({n: p.grad.clone() for n, p in s.G.named_parameters()}))
    a.train_step(), s.train_step()
    for (k, x), y in zip(a.D.state_dict().items(), s.D.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=k)
    assert not torch.allclose(a.G.net[0][0].weight, s.G.net[0][0].weight)
    # G's gradient recomputed by hand through the pre-update D.
    fresh = Trainer(TrainConfig(**SMALL, dropout=0.0, schedule="simultaneous"), data)
    fresh.batches.start_epoch(0)
    fresh.batches.next()
    z = torch.randn(16, 8, generator=fresh.step.noise)
    g_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        d_before(fresh.G(z)), torch.ones(16, 1))
    want = torch.autograd.grad(g_loss, list(fresh.G.parameters()))
    for (n, _), w in zip(fresh.G.named_parameters(), want):
        torch.testing.assert_close(grads[n], w, rtol=1e-4, atol=1e-7, msg=n)


def test_any_discriminator_takes_the_two_pass_simultaneous_step():
    """A D without ghost rows (here the plain nn one inside the engine) gets
    one forward and each loss's backward into its own parameters: the same
    training as the one-sweep path."""
    cfg = TrainConfig(**SMALL, dropout=0.0)
    G, D = build_models(cfg)
    G2, D2 = copy.deepcopy(G), build_models(TrainConfig(**SMALL, dropout=0.0, reference=True))[1]
    D2.load_state_dict(D.state_dict())
    data = _data()
    kw = dict(batch_size=16, latent_dim=8, seed=3, schedule="simultaneous")
    one = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()),
                  batches=ResidentBatches(data, 16, seed=1), **kw)
    two = GANStep(G2, D2, make_adam(G2.parameters()), make_adam(D2.parameters()),
                  batches=ResidentBatches(data, 16, seed=1), **kw)
    assert one.ghost and not two.ghost
    one.batches.start_epoch(0)
    two.batches.start_epoch(0)
    for _ in range(4):
        torch.testing.assert_close(torch.stack(one()), torch.stack(two()), rtol=1e-5, atol=1e-6)
    for (k, x), y in zip(D.state_dict().items(), D2.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ the one-sweep layer
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows,ghost", [(1, 1), (3, 2), (6, 3), (10, 5)])
@pytest.mark.parametrize("case", CASES)
def test_ghost_rows_equal_two_backward_passes(case, rows, ghost, p):
    """Discriminator(x, ghost=...) against plain autograd over one ordinary
    forward: dW from the x rows' loss alone, the ghost rows' loss reaching the
    ghost input only, x's own input gradient too; odd widths, dropout on/off."""
    name, device = case
    require(name, device)
    torch.manual_seed(0)
    D = Discriminator(in_dim=13, hidden=(11, 7), dropout=p).to(device).train()
    D2 = copy.deepcopy(D)
    real = torch.randn(rows - ghost, 13, device=device)
    src = torch.randn(ghost, 13, device=device, requires_grad=True)
    wx = torch.randn(rows, 1, device=device)
    wg = torch.randn(ghost, 1, device=device)
    with ran(name, "linear_act_forward"), ran(name, "linear_act_backward"):
        x = torch.cat([src.detach(), real]).requires_grad_()
        out, out_g = D(x, ghost=src)
        ((out * wx).sum() + (out_g * wg).sum()).backward()
        # the same masks: D2 holds D's dropout counters from before the forward
        xx = torch.cat([src, real])
        y = D2(xx)
    torch.testing.assert_close(out, y.detach())
    torch.testing.assert_close(out_g, y.detach()[:ghost])
    with fastgan.use_backend(name):
        want_w = torch.autograd.grad((y * wx).sum(), [*D2.parameters(), xx], retain_graph=True)
        want_src = torch.autograd.grad((y[:ghost] * wg).sum(), src)[0]
    for (n, q), w in zip(D.named_parameters(), want_w):
        torch.testing.assert_close(q.grad, w, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(x.grad, want_w[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(src.grad, want_src, rtol=1e-5, atol=1e-6)


def test_ghost_rows_bf16_autocast():
    """Under bf16 autocast the ghost path matches two backward passes of the
    same bf16 forward to bf16 round-off."""
    torch.manual_seed(0)
    D = Discriminator(in_dim=20, hidden=(24, 12), dropout=0.2).train()
    D2 = copy.deepcopy(D)
    real, src = torch.randn(4, 20), torch.randn(4, 20, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_g = D(torch.cat([src.detach(), real]), ghost=src)
        (out.float().sum() + 2 * out_g.float().sum()).backward()
        y = D2(torch.cat([src, real]))
        want_w = torch.autograd.grad(y.float().sum(), list(D2.parameters()), retain_graph=True)
        want_src = torch.autograd.grad(2 * y[:4].float().sum(), src)[0]
    assert out.dtype == torch.bfloat16
    for (n, q), w in zip(D.named_parameters(), want_w):
        torch.testing.assert_close(q.grad, w, rtol=2e-2, atol=2e-2, msg=n)
    torch.testing.assert_close(src.grad, want_src, rtol=2e-2, atol=2e-2)


def test_ghost_errors():
    D = Discriminator(in_dim=6, hidden=(5,))
    with pytest.raises(ValueError, match="ghost: expected at most 2 rows of 6"):
        D(torch.zeros(2, 6), ghost=torch.zeros(3, 6))
    with pytest.raises(ValueError, match="ghost: only a Discriminator of fused"):
        Discriminator(in_dim=6, hidden=(5,), fused=False)(torch.zeros(2, 6),
                                                          ghost=torch.zeros(1, 6))
    with pytest.raises(ConfigError, match="schedule must be one of"):
        GANStep(*build_models(TrainConfig(**SMALL)), None, None, batch_size=16, latent_dim=8,
                schedule="lockstep")
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainConfig(schedule="both")


# ------------------------------------------------------------------ GEMM FLOPs
def _counted(step, n=1):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        for _ in range(n):
            step()
    return fc.get_total_flops()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_flops_count_the_gemms_each_schedule_runs(schedule, monkeypatch):
    """step_flops(schedule=) against the GEMM FLOPs torch counts.

    The plain-PyTorch reference does one D pass (forward FLOPs) more than
    needed in each schedule: alternating's g_loss.backward() also forms D's
    weight gradient of the G loss; simultaneous's autograd.grad of the G loss
    multiplies the whole [fake; real] batch through D's input gradients (zero
    on the real rows). The engine on the reference backend runs exactly the
    count in both: the G step's backward through the frozen D, and the ghost
    rows of the simultaneous sweep, skip D's dW (``compute_dw``)."""
    cfg = TrainConfig(**SMALL, dropout=0.2)
    B_, G, D = 16, *build_models(TrainConfig(**SMALL, reference=True))
    want = B.step_flops(G, D, B_, schedule)
    f_d = B.forward_flops(D, B_)
    ref = ReferenceStep(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                        batch_size=B_, latent_dim=8, schedule=schedule)
    real = _data(n=16)
    assert _counted(lambda: ref(real)) == want + f_d
    # The op bodies run directly even for nn.Parameter arguments, so the counter
    # sees the reference backend's own GEMMs (the registered op hides them).
    import fastgan.ops.registry
    monkeypatch.setattr(fastgan.ops.registry, "_eager", lambda *args: True)
    Gf, Df = build_models(cfg)
    eng = GANStep(Gf, Df, make_adam(Gf.parameters()), make_adam(Df.parameters()), batch_size=B_,
                  latent_dim=8, schedule=schedule)
    with fastgan.use_backend("reference"):
        assert _counted(lambda: eng(real)) == want


def test_step_flops_seed_gan_numbers():
    G, D = Generator(fused=False), Discriminator(fused=False)
    assert B.step_flops(G, D, 64, "alternating") == 1_854_406_656
    assert B.step_flops(G, D, 64, "simultaneous") == 1_667_727_360
    assert B.step_flops(G, D, 64) == 2 * 64 * (3 * 1_483_776 + 9 * 1_458_432)  # nominal
    with pytest.raises(ValueError, match="schedule"):
        B.step_flops(G, D, 64, "other")


def test_bench_times_both_schedules_side_by_side():
    cfg = B.Config(device=torch.device("cpu"), batches=(4,), contenders=("fastgan-cpu",)
                   if "cpu" in fastgan.backends() else ("fastgan-reference",), ops=(),
                   warmup=1, iters=2, min_time_s=0.0, schedules=SCHEDULES)
    records = B.run(cfg)
    assert [r["op"] for r in records] == [f"gan_step:{s}" for s in SCHEDULES]
    G, D = B.workloads.seed_gan()
    for r, s in zip(records, SCHEDULES):
        assert r["median_ms"] is not None, r["note"]
        assert r["gflop"] == pytest.approx(B.step_flops(G, D, 4, s) / 1e9)


# ------------------------------------------------------------------ preset
def test_seed_preset_builds_the_seed_gan():
    cfg = TrainConfig(**{**SMALL, **preset("seed"), "batch_size": 16})
    tr = Trainer(cfg, _data())
    assert tr.step.schedule == "simultaneous" and tr.step.ghost
    g_blocks, d_blocks = list(tr.G.net)[:-1], list(tr.D.net)[:-1]
    assert all(b.activation() == ("leaky_relu", 0.3) for b in g_blocks)
    assert all(b.activation() == ("leaky_relu", 0.2) for b in d_blocks)
    assert all(b[1].eps == 1e-3 and b[1].momentum == 0.01 for b in g_blocks)
    for opt in (tr.g_opt, tr.d_opt):
        (group,) = opt.param_groups
        assert (group["lr"], group["betas"], group["eps"]) == (1e-4, (0.9, 0.999), 1e-7)
    for lin in (m for m in (*tr.G.modules(), *tr.D.modules()) if isinstance(m, torch.nn.Linear)):
        assert torch.count_nonzero(lin.bias) == 0
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound
    tr.train_step()
    assert PRESETS["seed"]["batch_size"] == 32
    with pytest.raises(ConfigError, match="preset must be one of seed"):
        preset("keras")


def test_keras_init_is_glorot_uniform():
    torch.manual_seed(0)
    lin = keras_init_(torch.nn.Sequential(torch.nn.Linear(300, 500)))[0]
    bound = (6 / 800) ** 0.5
    assert lin.weight.abs().max() <= bound
    assert lin.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    assert torch.count_nonzero(lin.bias) == 0


def test_checkpoint_without_new_fields_loads():
    """A checkpoint written before the schedule and preset fields keeps its meaning."""
    old = {k: v for k, v in TrainConfig(**SMALL).to_dict().items()
           if k not in ("g_negative_slope", "bn_eps", "bn_momentum", "adam_eps", "init",
                        "schedule")}
    cfg = TrainConfig.from_dict(old)
    assert cfg.schedule == "alternating" and cfg.g_slope == cfg.negative_slope
    tr = Trainer(TrainConfig(**SMALL), _data())
    state = tr.state_dict()
    state["config"] = old
    Trainer(TrainConfig(**SMALL), _data()).load_state_dict(state)


def test_train_preset_seed_end_to_end(tmp_path, capsys):
    """The seed GAN's system on the embedded data: a sample grid, the preset in
    the checkpoint, resume under the preset, a contradicting flag refused."""
    from fastgan import checkpoint
    out = tmp_path / "seed"
    args = ["train", "--preset", "seed", "--steps", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "simultaneous schedule" in capsys.readouterr().out
    assert (out / "samples" / "step_0000004.png").stat().st_size > 1000
    cfg = checkpoint.load(out / "checkpoint.pt")["config"]
    for k, v in preset("seed").items():
        assert cfg[k] == (list(v) if isinstance(v, tuple) else v), k
    assert main(["train", "--preset", "seed", "--resume", "--steps", "6", "--out", str(out),
                 "--no-progress"]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["steps"] == 6
    capsys.readouterr()
    assert main(["train", "--resume", "--schedule", "alternating", "--steps", "8",
                 "--out", str(out), "--no-progress"]) == 1
    assert "--schedule alternating contradicts" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["train", "--steps", "2", "--batch-size", "16", "--out", str(other),
                 "--no-progress", "--schedule", "simultaneous"]) == 0
    capsys.readouterr()
    assert main(["train", "--preset", "seed", "--resume", "--steps", "4", "--out", str(other),
                 "--no-progress"]) == 1
    assert "--preset seed sets" in capsys.readouterr().err


# ------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(G, D) -> dict:
    return {f"{net}.{k}": v.detach().clone() for net, m in (("G", G), ("D", D))
            for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}


def _ddp_worker(rank, world, port, out_dir):
    from fastgan import distributed as fdist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = fdist.init("cpu")
    try:
        result = {}
        for schedule in SCHEDULES:
            cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule)
            tr = Trainer(cfg, _data(n=128), dist=ctx)
            for _ in range(3):
                tr.train_step()
            result[schedule] = _weights(tr.G, tr.D)
        # The two-pass path (a D without ghost rows) under DDP as well.
        G, D = build_models(TrainConfig(**SMALL, dropout=0.0))
        D = build_models(TrainConfig(**SMALL, dropout=0.0, reference=True))[1]
        Gw, Dw = fdist.wrap(G, ctx), fdist.wrap(D, ctx)
        step = GANStep(Gw, Dw, make_adam(G.parameters()), make_adam(D.parameters()),
                       batch_size=8, latent_dim=8, seed=ctx.seed(0), schedule="simultaneous")
        real = _data(n=8, seed=rank)
        for _ in range(2):
            step(real)
        result["two_pass"] = {k: v.detach().clone() for k, v in D.state_dict().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        fdist.shutdown()


def test_ddp_two_gloo_ranks_both_schedules(tmp_path):
    """2 CPU ranks, each its own shard, noise and masks: after a few steps of
    each schedule G's and D's weights are identical on both ranks (DDP averaged
    both networks' gradients), and differ from the start."""
    port = _free_port()
    ctx = mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail("2 processes still running after 120 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    start = _weights(*build_models(TrainConfig(**SMALL, dropout=0.2)))
    for schedule in (*SCHEDULES, "two_pass"):
        for k, v in r0[schedule].items():
            torch.testing.assert_close(v, r1[schedule][k], rtol=0, atol=0, msg=f"{schedule} {k}")
        if schedule != "two_pass":
            for k in ("G.net.0.0.weight", "D.net.0.0.weight"):
                assert not torch.equal(r0[schedule][k], start[k]), k

"""bf16 training (fastgan.train.precision): bf16 Linear weights, fp32 master
weights in the optimizer, BatchNorm and losses in fp32.

MasterWeightAdam against fp32 Adam on the masters (bit for bit), the bf16
parameters as the masters rounded, no per-step allocation of its buffers,
state-dict and checkpoint round trips that resume identically, BN kept fp32,
the fused bf16 step against the plain-PyTorch one and against fp32, the CUDA
graph path on CPU stand-ins, `fastgan train --dtype bf16` end to end (sample,
eval), and one-line errors for a bad dtype."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from helpers import assert_matches, ran
from test_train import _FakeGraph, assert_states_equal, fake_cuda  # noqa: F401 (a fixture)

import fastgan
from fastgan import quality as Q
from fastgan.cli import main
from fastgan.train import (ConfigError, FusedAdam, GANStep, MasterWeightAdam, ReferenceStep,
                           ResidentBatches, TrainConfig, Trainer, build_models, make_adam)
from fastgan.train import checkpoint
from fastgan.train.config import SCHEDULES
from fastgan.train.precision import DTYPES, input_dtype, to_train_dtype

SMALL = dict(latent_dim=8, g_hidden=(32, 64), d_hidden=(64, 32), image_dim=48, batch_size=16)
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
BF16 = torch.bfloat16
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(n=160, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g) * 2 - 1


def _params(seed=0, shapes=((33, 17), (17,), (5, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in shapes]


# ------------------------------------------------------------------ the optimizer
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "default"])
def test_master_adam_equals_fp32_adam_on_the_masters(fused):
    """bf16 parameters: the masters are exactly what torch's Adam makes of fp32
    copies fed the same (bf16) gradients; each bf16 parameter is its master
    rounded. An fp32 parameter in the same optimizer is plain Adam's. A step
    without a gradient leaves a parameter and its state alone, as Adam does."""
    init = _params()
    shapes = [t.shape for t in init]
    low = [torch.nn.Parameter(t.to(BF16)) for t in init[:2]]
    full = torch.nn.Parameter(init[2].clone())
    gold = [torch.nn.Parameter(p.detach().float()) for p in low] + \
        [torch.nn.Parameter(init[2].clone())]
    kw = dict(lr=1e-2, betas=(0.5, 0.999), eps=1e-8, weight_decay=0.01, fused=fused)
    opt = MasterWeightAdam(low + [full], **kw)
    ref = torch.optim.Adam(gold, **kw)
    assert opt.adam.param_groups[0]["fused"] is fused
    for step in range(6):
        grads = _grads(step, shapes)
        skip = step == 3  # the first parameter gets no gradient in this step
        for p, q, g in zip(low + [full], gold, grads):
            p.grad = g.to(p.dtype)
            q.grad = g.to(p.dtype).float()
        if skip:
            low[0].grad = gold[0].grad = None
        opt.step()
        ref.step()
        for p, q in zip(low, gold):
            master = opt.state[p]["master"]
            assert master.dtype == torch.float32 and torch.equal(master, q.detach())
            assert p.dtype == BF16 and torch.equal(p.detach(), q.detach().to(BF16))
        assert torch.equal(full.detach(), gold[2].detach())
        for p, q in zip(low + [full], gold):
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][k], ref.state[q][k]), (step, k)
    assert float(opt.state[low[0]]["step"]) == 5 and float(opt.state[low[1]]["step"]) == 6


def test_fp32_params_are_exactly_plain_adam():
    """For an fp32 model MasterWeightAdam keeps no masters and is torch's Adam:
    the same parameters, state and state_dict; make_adam gives torch's Adam
    (``FusedAdam``, whose step tests/train/test_adam.py checks against it)."""
    a = [torch.nn.Parameter(t) for t in _params()]
    b = [torch.nn.Parameter(t) for t in _params()]
    opt, ref = MasterWeightAdam(a, lr=1e-3, fused=True), torch.optim.Adam(b, lr=1e-3, fused=True)
    assert not opt._low and opt.state_dict() == ref.state_dict()
    for step in range(4):
        for p, q, g in zip(a, b, _grads(step, [t.shape for t in a])):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert_states_equal(opt.state_dict(), ref.state_dict())
    assert type(make_adam(b)) is FusedAdam
    assert type(make_adam([torch.nn.Parameter(torch.ones(2, dtype=BF16))])) is MasterWeightAdam


def test_step_allocates_no_buffers():
    """The masters' gradient buffers, the masters and the parameters keep their
    storage across steps (copy_ into what exists), also after a step in which
    a parameter had no gradient and after zero_grad(set_to_none=True)."""
    ps = [torch.nn.Parameter(t.to(BF16)) for t in _params()]
    opt = MasterWeightAdam(ps, lr=1e-3, fused=True)
    ptrs = None
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        for p, g in zip(ps, _grads(step, [t.shape for t in ps])):
            p.grad = g.to(BF16)
        if step == 2:
            ps[1].grad = None
        opt.step()
        now = [(p.data_ptr(), m.data_ptr(), buf.data_ptr()) for p, m, buf in opt._low]
        assert ptrs is None or now == ptrs
        ptrs = now
        assert all(m.grad is None or m.grad.data_ptr() == buf.data_ptr()
                   for _, m, buf in opt._low)


def test_lr_edits_reach_the_masters():
    """param_groups hold the model's parameters and the hyper-parameters; an lr
    schedule (which edits them) drives the inner Adam."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=BF16))
    opt = MasterWeightAdam([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0)  # lr 0 from the start
    p.grad = torch.ones(4, dtype=BF16)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["params"][0] is p and opt.adam.param_groups[0]["lr"] == 0.0
    assert torch.equal(opt.state[p]["master"], torch.zeros(4))


def test_state_dict_round_trip_resumes_identically():
    """The state dict holds the fp32 masters and moments (a plain torch.load
    would round them to the parameters' bf16); a fresh optimizer loading it
    continues bit for bit, and takes its parameters from the masters."""
    init = _params()
    shapes = [t.shape for t in init]

    def fresh():
        ps = [torch.nn.Parameter(t.to(BF16)) for t in init[:2]] + \
            [torch.nn.Parameter(init[2].clone())]
        return ps, MasterWeightAdam(ps, lr=1e-2, betas=(0.5, 0.999), fused=True)

    def steps(ps, opt, lo, hi):
        for s in range(lo, hi):
            for p, g in zip(ps, _grads(s, shapes)):
                p.grad = g.to(p.dtype)
            opt.step()

    a, opt_a = fresh()
    steps(a, opt_a, 0, 7)
    b, opt_b = fresh()
    steps(b, opt_b, 0, 3)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["state"][0]["master"].dtype == torch.float32
    assert saved["state"][0]["exp_avg"].dtype == torch.float32
    assert "master" not in saved["state"][2]
    c, opt_c = fresh()   # its bf16 parameters are the initial ones: loading overwrites them
    with torch.no_grad():
        c[2].copy_(b[2])   # an fp32 parameter comes from the model's state_dict, as for Adam
    opt_c.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(b, c))
    steps(c, opt_c, 3, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert_states_equal(opt_a.state_dict(), opt_c.state_dict())
    with pytest.raises(ValueError, match="parameter groups do not match"):
        MasterWeightAdam(c[:2]).load_state_dict(saved)


# ------------------------------------------------------------------ models and the step
@pytest.mark.parametrize("reference", [False, True], ids=["fused", "plain"])
def test_models_in_bf16_keep_batchnorm_fp32(reference):
    """cfg.dtype bf16: every Linear weight and bias bf16; BatchNorm1d's
    parameters and running statistics fp32, also after training steps and a
    move; the optimizer keeps masters only for the bf16 parameters; G's
    samples come back as fp32."""
    cfg = TrainConfig(**SMALL, dtype="bf16", reference=reference)
    tr = Trainer(cfg, _data())
    for _ in range(3):
        tr.train_step()
    tr.G.to("cpu")
    for model in (tr.G, tr.D):
        assert input_dtype(model) == BF16
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                assert m.weight.dtype == m.bias.dtype == BF16
            if isinstance(m, torch.nn.BatchNorm1d):
                assert m.weight.dtype == m.bias.dtype == torch.float32
                assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    bn = [m for m in tr.G.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bn) == len(cfg.g_hidden) and float(bn[0].num_batches_tracked) == 3
    assert isinstance(tr.g_opt, MasterWeightAdam)
    lows = {id(p) for p, _, _ in tr.g_opt._low}
    for p in tr.G.parameters():
        assert (id(p) in lows) == (p.dtype == BF16)
        st = tr.g_opt.state[p]
        assert ("master" in st) == (p.dtype == BF16)
        assert st["exp_avg"].dtype == torch.float32
    stats = tr.train_step()
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in stats)
    assert tr.sample(tr.fixed_noise(4)).dtype == torch.float32
    assert to_train_dtype(tr.G, "fp32") is tr.G and input_dtype(tr.G) == torch.float32
    assert all(m.weight.dtype == torch.float32 for m in tr.G.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d)))


def test_losses_reduce_in_fp32():
    """gan_bce on bf16 logits gives fp32 losses and means; the reference's BCE
    runs on the logits in fp32 as well."""
    logits = (torch.randn(64, 1) * 3).to(BF16)
    d = fastgan.functional.gan_bce_d(logits[:32], logits[32:], 0.0)
    gold = (torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:32].double(), torch.ones(32, 1, dtype=torch.float64))
        + torch.nn.functional.binary_cross_entropy_with_logits(
        logits[32:].double(), torch.zeros(32, 1, dtype=torch.float64)))
    assert d.loss.dtype == d.d_real.dtype == d.d_fake.dtype == torch.float32
    assert abs(float(d.loss) - float(gold)) < 1e-5
    ref = ReferenceStep._g_loss(logits)
    assert ref.dtype == torch.float32


def _fused_ops():
    """Every fused layer through its fused op (at these small shapes the speed
    rule of fastgan.nn.layers may run the plain computation instead)."""
    force = getattr(fastgan.nn.layers, "fused_path", None)
    return force("fused") if force is not None else contextlib.nullcontext()


def _record_grads(net, opt, used: dict) -> None:
    """``used[(net, name)]``: the gradient ``opt`` steps each parameter with (the
    plain alternating loop lets the G loss add to D's .grad after D's step)."""
    names = {id(p): k for k, p in net.named_parameters()}

    def hook(o, args, kwargs):
        used.update({(net, names[id(p)]): p.grad.clone()
                     for group in o.param_groups for p in group["params"]})
    opt.register_step_pre_hook(hook)


def _bf16_trio(schedule):
    """The engine on fused bf16 models, ReferenceStep on plain bf16 models, and
    ReferenceStep on plain fp64 models (the gold), same weights, noise and
    batches; dropout off (nn.Dropout draws other masks than the fused layers).
    D's lr is 0, so that the alternating G step meets the same D in all three."""
    cfg = dict(SMALL, dropout=0.0, schedule=schedule)
    G, D = build_models(TrainConfig(**cfg, dtype="bf16"))
    data = _data()
    kw = dict(batch_size=16, latent_dim=8, seed=3, schedule=schedule)
    steps = []
    for kind in ("engine", "plain", "gold"):
        if kind == "engine":
            g, d = G, D
        else:
            g, d = build_models(TrainConfig(**cfg, dtype="bf16", reference=True))
            g.load_state_dict(G.state_dict())
            d.load_state_dict(D.state_dict())
            if kind == "gold":
                g, d = g.double(), d.double()
        opts = (MasterWeightAdam(g.parameters(), 2e-4, (0.5, 0.999), fused=kind == "engine"),
                MasterWeightAdam(d.parameters(), 0.0, (0.5, 0.999)))
        step = (GANStep if kind == "engine" else ReferenceStep)(
            g, d, *opts, batches=ResidentBatches(data, 16, seed=1), **kw)
        step.batches.start_epoch(0)
        step.used = {}
        for net, opt in zip((g, d), opts):
            _record_grads(net, opt, step.used)
        steps.append(step)
    return steps


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fused_bf16_step_equals_plain_bf16_step(name, schedule):
    """One bf16 step of the engine (fused ops of backend ``name``) and of the
    plain-PyTorch loop on plain bf16 models (nn.Linear in bf16, nn.BatchNorm1d
    in fp32, F.binary_cross_entropy_with_logits): the same stats to bf16
    tolerance, and every parameter's gradient within twice the plain bf16
    loop's own error against the fp64 gold (plus the bf16 floor)."""
    engine, plain, gold = _bf16_trio(schedule)
    with _fused_ops(), ran(name, "linear_bn_act_forward", "linear_act_backward"):
        s1 = engine()
    s0, s64 = plain(), gold()
    torch.testing.assert_close(torch.stack(s1), torch.stack(s0), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.stack(s0), torch.stack(s64), rtol=2e-2, atol=2e-2)
    # A Linear bias in front of BatchNorm has a true gradient of 0 (BN takes
    # the mean out): its computed gradient is round-off, compared with nothing.
    pre_bn = {f"net.{i}.0.bias" for i in range(len(SMALL["g_hidden"]))}
    for model, plain_model, gold_model in ((engine.G, plain.G, gold.G),
                                           (engine.D, plain.D, gold.D)):
        grads = [{k: step.used[(m, k)] for k, _ in m.named_parameters()}
                 for m, step in zip((model, plain_model, gold_model), (engine, plain, gold))]
        keys = [k for k in grads[2] if not (model is engine.G and k in pre_bn)]
        for k in keys:
            assert grads[0][k].dtype == grads[1][k].dtype, k
        assert_matches(f"{name} bf16 {schedule}", grads[0], grads[1], grads[2], BF16, keys)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_bf16_step_tracks_the_fp32_step(schedule):
    """The same run in bf16 and fp32 (same initial weights, rounded; same noise
    and batches): the first steps' stats agree to bf16 tolerance."""
    data = _data()
    runs = [Trainer(TrainConfig(**SMALL, dropout=0.2, dtype=d, schedule=schedule), data)
            for d in DTYPES]
    for _ in range(3):
        s32, s16 = (torch.stack(t.train_step()) for t in runs)
        torch.testing.assert_close(s16, s32, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_graph_code_path_on_cpu_bf16(fake_cuda, schedule):  # noqa: F811 (the fixture)
    """GANStep's capture path (warm-up, restore, capture, replay) in bf16 with
    CPU stand-ins for the CUDA calls: bit-identical to an eager bf16 run. The
    restore after the warm-up puts the masters back and zeroes the Adam state
    the warm-up created (GANStep._restore)."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule, dtype="bf16")
    data = _data()
    graphed, eager = Trainer(cfg, data), Trainer(cfg, data)
    graphed.step.graphs = True
    _FakeGraph.step = graphed.step
    graphed.batches.start_epoch(0)
    eager.batches.start_epoch(0)
    for i in range(4):
        out = graphed.step()
        if i == 0:  # the stand-in capture ran one step
            eager.step()
        assert torch.equal(torch.stack(out), torch.stack(eager.step()))
    assert_states_equal(graphed.state_dict(), eager.state_dict())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("reference", [False, True], ids=["engine", "reference"])
def test_bf16_resume_equals_uninterrupted(tmp_path, reference, schedule):
    """Checkpoint after 5 steps, resume to 11: bit-identical to 11 straight
    steps; the checkpoint stores dtype and the fp32 masters."""
    cfg = TrainConfig(**SMALL, dropout=0.2, reference=reference, schedule=schedule, dtype="bf16")
    data = _data(n=64)

    def run(steps, start=None):
        tr = Trainer(cfg, data)
        if start is not None:
            tr.load_state_dict(start)
        while tr.steps < steps:
            tr.train_step()
        return tr

    straight = run(11)
    first = run(5)
    checkpoint.save(first.state_dict(), tmp_path / "c.pt")
    del first
    saved = checkpoint.load(tmp_path / "c.pt")
    assert saved["config"]["dtype"] == "bf16"
    assert saved["generator"]["net.0.0.weight"].dtype == BF16
    master = saved["g_opt"]["state"][0]["master"]
    assert master.dtype == torch.float32
    assert torch.equal(master.to(BF16), saved["generator"]["net.0.0.weight"])
    torch.manual_seed(1234)
    resumed = run(11, saved)
    assert_states_equal(straight.state_dict(), resumed.state_dict())
    assert torch.equal(straight.sample(straight.fixed_noise(4)),
                       resumed.sample(resumed.fixed_noise(4)))


def test_checkpoint_dtype_must_match_and_old_ones_are_fp32():
    """A bf16 checkpoint does not load into an fp32 run (ConfigError naming
    dtype); a checkpoint written before the dtype existed loads as fp32."""
    data = _data(n=64)
    bf = Trainer(TrainConfig(**SMALL, dtype="bf16"), data)
    bf.train_step()
    fp = Trainer(TrainConfig(**SMALL), data)
    with pytest.raises(ConfigError, match="dtype='bf16'.*dtype='fp32'"):
        fp.load_state_dict(bf.state_dict())
    fp.train_step()
    old = fp.state_dict()
    del old["config"]["dtype"]
    assert TrainConfig.from_dict(old["config"]).dtype == "fp32"
    again = Trainer(TrainConfig(**SMALL), data)
    again.load_state_dict(old)
    assert_states_equal(again.state_dict(), fp.state_dict())


def test_bad_dtype_is_a_config_error():
    for bad in ("fp16", "bfloat16", None, torch.bfloat16):
        with pytest.raises(ConfigError, match=r"^dtype must be one of fp32, bf16, got"):
            TrainConfig(dtype=bad)
    with pytest.raises(ConfigError, match="dtype"):
        to_train_dtype(torch.nn.Linear(2, 2), "fp16")


def test_bf16_checkpoint_scores_as_it_ran():
    """generator_from_state of a bf16 checkpoint: a plain bf16 generator (BN
    fp32) whose images are the trained fused G's to bf16 rounding, in fp32."""
    tr = Trainer(TrainConfig(**dict(SMALL, image_dim=784), dtype="bf16"), _data(n=64, dim=784))
    for _ in range(2):
        tr.train_step()
    G = Q.generator_from_state(tr.state_dict())
    assert input_dtype(G) == BF16
    images = Q.generate(G, 8, seed=5)
    assert images.dtype == torch.float32 and images.shape == (8, 784)
    z = torch.randn(8, SMALL["latent_dim"], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(images, tr.sample(z), rtol=0, atol=2e-2)
    assert "bfloat16 weights" in Q.describe(G)


# ------------------------------------------------------------------ CLI
TINY = ["--batch-size", "16", "--latent-dim", "8", "--g-hidden", "16", "--d-hidden", "16",
        "--no-progress"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """200 MNIST-format images (random pixels, labels 0-9), used unverified."""
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    x = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(200) % 10, x_test=x[:20],
             y_test=np.arange(20) % 10)
    return path


def _train(npz, out, *extra):
    return main(["train", "--data", str(npz), "--no-verify", "--out", str(out), *TINY,
                 *map(str, extra)])


def test_cli_bf16_train_sample_eval_resume(npz, tmp_path, capsys, monkeypatch):
    """fastgan train --dtype bf16: a checkpoint (bf16 weights, fp32 masters,
    dtype recorded), sample grids; fastgan sample and fastgan eval on it;
    --resume continues in bf16 without the flag and equals a straight run;
    a contradicting --dtype is one error line."""
    out = tmp_path / "run"
    assert _train(npz, out, "--dtype", "bf16", "--steps", 15, "--log-every", 5) == 0
    printed = capsys.readouterr().out
    assert "bf16 weights with fp32 master weights" in printed and "done: 15 steps" in printed
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["config"]["dtype"] == "bf16" and state["steps"] == 15
    assert state["generator"]["net.0.0.weight"].dtype == BF16
    assert state["generator"]["net.0.1.running_var"].dtype == torch.float32
    assert state["g_opt"]["state"][0]["master"].dtype == torch.float32
    assert (out / "samples" / "epoch_0001.png").exists()
    assert (out / "samples" / "step_0000015.png").exists()
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--n", "9",
                 "--out", str(grid)]) == 0
    from PIL import Image
    assert Image.open(grid).size == (2 * (3 * 30 + 2),) * 2
    scores = tmp_path / "s.json"
    # fastgan eval has no --no-verify: its data is these images, unverified.
    import fastgan.train.data as fdata
    load = fdata.load_mnist
    monkeypatch.setattr(fdata, "load_mnist", lambda path=None, **kw: load(npz, verify=False))
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(npz),
                 "--n", "40", "--cache-dir", str(tmp_path / "c"), "--classifier-epochs", "1",
                 "--json", str(scores), "-q"]) == 0
    assert "bfloat16 weights" in capsys.readouterr().out
    assert json.loads(scores.read_text())["generated"]["n"] == 40

    assert _train(npz, out, "--steps", 20, "--resume") == 0
    assert _train(npz, tmp_path / "straight", "--dtype", "bf16", "--steps", 20) == 0
    a = checkpoint.load(out / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    assert_states_equal({k: a[k] for k in ("generator", "discriminator", "g_opt", "d_opt")},
                        {k: b[k] for k in ("generator", "discriminator", "g_opt", "d_opt")})
    capsys.readouterr()
    assert _train(npz, out, "--dtype", "fp32", "--steps", 25, "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dtype fp32 contradicts the checkpoint's bf16" in err[0], err


def test_cli_bad_dtype_is_one_line(npz, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _train(npz, tmp_path / "x", "--dtype", "fp16")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastgan train: error: argument --dtype: invalid choice: 'fp16'")
    # a checkpoint whose config names another dtype (damaged or hand-edited)
    out = tmp_path / "r"
    assert _train(npz, out, "--dtype", "bf16", "--steps", 2) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    state["config"]["dtype"] = "fp8"
    checkpoint.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert _train(npz, out, "--steps", 4, "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dtype must be one of fp32, bf16, got 'fp8'" in err[0], err


# ------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_graph_bf16_equals_eager(schedule):
    """On a GPU: the bf16 step captured in a CUDA graph (capturable fused Adam on
    the fp32 masters) equals the eager bf16 step bit for bit."""
    cfg = TrainConfig(**SMALL, dropout=0.2, schedule=schedule, dtype="bf16")
    data = _data()
    graphed = Trainer(cfg, data, device="cuda", graphs=True)
    eager = Trainer(cfg, data, device="cuda", graphs=False)
    assert graphed.g_opt.adam.param_groups[0]["capturable"]
    assert graphed.g_opt.adam.param_groups[0]["fused"]
    for _ in range(6):
        s1, s0 = graphed.train_step(), eager.train_step()
        assert torch.equal(torch.stack(s1), torch.stack(s0))
    assert_states_equal(graphed.state_dict(), eager.state_dict())
    ckpt = eager.state_dict()
    assert ckpt["g_opt"]["state"][0]["master"].device.type == "cuda"


# ------------------------------------------------------------------ the one-pass CPU step
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("betas, weight_decay, maximize",
                         [((0.5, 0.999), 0.0, False), ((0.3, 0.99), 0.01, False),
                          ((0.9, 0.999), 0.0, True)],
                         ids=["gan", "lerp-from-grad+decay", "maximize"])
def test_one_pass_cpu_step_is_torch_fused_adam_bit_for_bit(dtype, betas, weight_decay, maximize):
    """With ``fused=True`` on the CPU the low-precision parameters take the cpu
    backend's one-pass step (csrc/cpu/master_adam.cpp): it ran (the masters get no
    gradient buffer), and masters, moments and steps equal torch's fused Adam on
    fp32 copies bit for bit, on tensors with a vector body and a tail (numel % 16)."""
    from helpers import require
    require("cpu", "cpu")
    from fastgan.train import precision
    shapes = [(1024, 784), (300, 7), (17,), (5, 3)]
    g0 = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g0) for s in shapes]
    low = [torch.nn.Parameter(t.to(dtype)) for t in init]
    gold = [torch.nn.Parameter(p.detach().float()) for p in low]
    kw = dict(lr=1e-2, betas=betas, weight_decay=weight_decay, maximize=maximize, fused=True)
    opt, ref = MasterWeightAdam(low, **kw), torch.optim.Adam(gold, **kw)
    assert precision._native_step(opt.adam.param_groups[0]) is not None
    for step in range(4):
        for p, q, g in zip(low, gold, _grads(step, shapes)):
            p.grad = g.to(dtype)
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        for p, q in zip(low, gold):
            st, gst = opt.state[p], ref.state[q]
            assert st["master"].grad is None   # stepped in C++, not by the inner Adam
            assert torch.equal(st["master"], q.detach()), step
            assert torch.equal(p.detach(), q.detach().to(dtype))
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(st[k], gst[k]), (step, k)


@pytest.mark.parametrize("kw", [dict(fused=True, amsgrad=True), dict(fused=None),
                                dict(fused=True, lr=torch.tensor(1e-2))],
                         ids=["amsgrad", "not-fused", "tensor-lr"])
def test_one_pass_step_leaves_what_it_does_not_compute_to_torch(kw):
    """amsgrad, an unfused Adam or a tensor lr: the masters go through the fp32
    gradient buffers and torch's Adam, as before (the same results as torch's)."""
    from fastgan.train import precision
    low = [torch.nn.Parameter(t.to(BF16)) for t in _params()]
    gold = [torch.nn.Parameter(p.detach().float()) for p in low]
    kw = {"lr": 1e-2, **kw}
    opt = MasterWeightAdam(low, **kw)
    ref = torch.optim.Adam(gold, **{**kw, "lr": kw["lr"].clone() if torch.is_tensor(kw["lr"])
                                    else kw["lr"]})
    assert precision._native_step(opt.adam.param_groups[0]) is None
    for step in range(3):
        for p, q, g in zip(low, gold, _grads(step, [t.shape for t in low])):
            p.grad = g.to(BF16)
            q.grad = p.grad.float()
        opt.step()
        ref.step()
    for p, q in zip(low, gold):
        assert opt.state[p]["master"].grad is not None
        assert torch.equal(opt.state[p]["master"], q.detach())

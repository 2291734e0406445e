"""The taped CPU step (fastgan.train.tape): GANStep without autograd equals
GANStep under autograd with every layer on its fused op, bit for bit (losses,
stats, gradients, parameters, BatchNorm statistics, dropout streams, Adam
state), in both schedules, fp32 and bf16, with dropout and label smoothing,
on each CPU backend; it hands the step to autograd whenever something would
see the difference (hooks, autocast, anomaly mode, the plain path forced,
models that are not chains of fused layers)."""
import pytest
import torch
from helpers import ran

import fastgan
from fastgan.nn import fused_path
from fastgan.nn.models import Discriminator, Generator
from fastgan.train import GANStep, ResidentBatches, make_adam
from fastgan.train import tape as T
from fastgan.train.config import SCHEDULES

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
B_, Z, IMG = 16, 8, 48
STEPS = 4


def _models(seed=0, dtype=torch.float32, dropout=0.2, fused=True):
    torch.manual_seed(seed)
    G = Generator(latent_dim=Z, hidden=(32, 64), out_dim=IMG, dropout=dropout, fused=fused)
    D = Discriminator(in_dim=IMG, hidden=(64, 32), dropout=dropout, fused=fused)
    if fused:
        fastgan.nn.seed_dropout(G, 11)
        fastgan.nn.seed_dropout(D, 12)
    return G.to(dtype), D.to(dtype)


def _step(G, D, schedule="alternating", tape=True, smoothing=0.0, batch=B_):
    data = torch.rand(160, IMG, generator=torch.Generator().manual_seed(5)) * 2 - 1
    batches = ResidentBatches(data.to(next(D.parameters()).dtype), batch, seed=1)
    batches.start_epoch(0)
    return GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()),
                   batch_size=batch, latent_dim=Z, batches=batches, seed=3, schedule=schedule,
                   smoothing=smoothing, tape=tape)


def _state(step):
    """Everything a step changes, as tensors."""
    out = {}
    for name, m in (("G", step.G), ("D", step.D)):
        for k, v in m.state_dict().items():
            out[f"{name}.{k}"] = v
        for i, layer in enumerate(fastgan.nn.layers._fused_layers(m)):
            out[f"{name}.rng{i}"] = layer.dropout_rng
        for k, p in m.named_parameters():
            if p.grad is not None:
                out[f"{name}.{k}.grad"] = p.grad
    for name, opt in (("g_opt", step.g_opt), ("d_opt", step.d_opt)):
        for i, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state[p].items():
                out[f"{name}.{i}.{k}"] = v
    return out


def _assert_identical(taped, plain, steps=STEPS, taped_steps=None):
    for i in range(steps):
        # (a layer that runs its children as modules drops out with torch's generator)
        torch.manual_seed(100 + i)
        a = taped()
        torch.manual_seed(100 + i)
        b = plain()
        for name, x, y in zip(a._fields, a, b):
            assert torch.equal(x, y), (i, name, x, y)
    assert taped.taped == (steps if taped_steps is None else taped_steps)
    assert plain.taped == 0
    sa, sb = _state(taped), _state(plain)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("path", ["auto", "fused"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_taped_step_equals_autograd_step(name, schedule, path):
    """Taped under the speed rule ("auto") or the fused path forced: every layer
    runs its fused op, as the autograd step does with the fused path forced. On
    the cpu backend each chain is one C++ call (chain_forward, chain_backward,
    chain_backward_ghost); elsewhere one op call per layer."""
    if name == "cpu":
        functions = ("chain_forward", "chain_backward") + (
            ("chain_backward_ghost",) if schedule == "simultaneous" else ())
    else:
        functions = ("linear_act_forward", "linear_act_backward", "linear_bn_act_backward")
    with ran(name, *functions):
        with fused_path(path):
            taped = _step(*_models(), schedule)
        with fused_path("fused"):
            plain = _step(*_models(), schedule, tape=False)
        for i in range(STEPS):
            with fused_path(path):
                a = taped()
            with fused_path("fused"):
                b = plain()
            assert all(torch.equal(x, y) for x, y in zip(a, b)), i
        assert taped.taped == STEPS
        _assert_identical(taped, plain, steps=0, taped_steps=STEPS)


def test_plain_path_forced_hands_the_step_to_autograd():
    with fused_path("plain"):
        _assert_identical(_step(*_models()), _step(*_models(), tape=False), taped_steps=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_taped_step_equals_autograd_step_bf16_smoothing_no_dropout(schedule):
    """bf16 training (bf16 weights, fp32 master weights, BN in fp32), label
    smoothing, batch 3, dropout off."""
    for dtype, dropout, smoothing, batch in ((torch.bfloat16, 0.2, 0.1, B_),
                                             (torch.float32, 0.0, 0.2, 3)):
        with fused_path("fused"):
            taped = _step(*_models(dtype=dtype, dropout=dropout), schedule,
                          smoothing=smoothing, batch=batch)
            plain = _step(*_models(dtype=dtype, dropout=dropout), schedule, tape=False,
                          smoothing=smoothing, batch=batch)
            _assert_identical(taped, plain)


def test_taped_step_is_what_the_default_engine_runs_on_cpu():
    """The seed models of ``fastgan train`` on the CPU are chains: taped by default."""
    step = _step(*_models())
    step()
    assert step.taped == 1 and T.chains(step) is not None


def _calls(counter):
    def hook(*args):
        counter.append(1)
    return hook


@pytest.mark.parametrize("where", ["layer", "child", "parameter", "global", "model"])
def test_hooks_hand_the_step_to_autograd(where):
    """A hook sees the step exactly as under autograd: while it is there the
    step is not taped, and it runs (the hook firing) with the numbers of the
    untaped engine carrying the same hook; without it, the steps are taped again."""
    taped, plain = _step(*_models()), _step(*_models(), tape=False)
    seen, handles = [], []
    for s in (taped, plain):
        if where == "layer":
            handles.append(s.D.net[1].register_forward_hook(_calls(seen)))
        elif where == "child":   # (the layer then runs its children as modules)
            handles.append(s.G.net[0][1].register_forward_pre_hook(_calls(seen)))
        elif where == "parameter":
            handles.append(s.G.net[1][0].weight.register_hook(lambda g: seen.append(1)))
        elif where == "model":
            handles.append(s.D.register_forward_hook(_calls(seen)))
    if where == "global":
        handles.append(torch.nn.modules.module.register_module_forward_hook(_calls(seen)))
    try:
        with fused_path("fused"):
            _assert_identical(taped, plain, steps=2, taped_steps=0)
    finally:
        for h in handles:
            h.remove()
    assert seen
    with fused_path("fused"):
        _assert_identical(taped, plain, steps=2, taped_steps=2)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("mode", ["autocast", "anomaly", "saved_tensors_hooks"])
def test_modes_hand_the_step_to_autograd(mode):
    taped, plain = _step(*_models()), _step(*_models(), tape=False)
    if mode == "autocast":
        ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)   # noqa: E731
    elif mode == "anomaly":
        ctx = lambda: torch.autograd.detect_anomaly(check_nan=False)   # noqa: E731
    else:
        ctx = lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)  # noqa: E731
    with ctx():
        a, b = taped(), plain()
    assert taped.taped == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert T.ready(taped, *taped._chains, torch.zeros(B_, IMG))


def test_what_is_not_a_chain_runs_under_autograd():
    """Plain-PyTorch models, a subclass with its own forward, a module wrapped
    around the networks, and a simultaneous D with a BatchNorm layer."""
    G, D = _models(fused=False)
    assert _step(G, D)._chains is None

    class MyG(Generator):
        def forward(self, z):
            return super().forward(z) * 1.0
    torch.manual_seed(0)
    g = MyG(latent_dim=Z, hidden=(32,), out_dim=IMG)
    assert T.Chain.of(g) is None
    assert T.Chain.of(torch.nn.Sequential(g.net)) is None
    assert T.Chain.of(g.net) is not None     # an nn.Sequential of fused layers is one
    G, D = _models()
    D.net[1] = fastgan.nn.LinearBNAct(64, 32, dropout=0.2)
    assert _step(G, D, "simultaneous", tape=True)._chains is None
    assert _step(G, D, "alternating")._chains is not None


def test_children_edited_after_the_step_was_built():
    """Replacing a layer's child by one it cannot fuse (D's activation by GELU)
    is seen at the next step: that step runs under autograd, with the same
    numbers as the untaped engine."""
    taped, plain = _step(*_models()), _step(*_models(), tape=False)
    with fused_path("fused"):
        _assert_identical(taped, plain, steps=1)
        for s in (taped, plain):
            s.D.net[0][1] = torch.nn.GELU()
        _assert_identical(taped, plain, steps=2, taped_steps=1)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_chain_equals_the_modules_under_autograd(name, train):
    """One chain, layer by layer against its modules' own forward and backward
    (fused path): BatchNorm with momentum=None and in eval, a bias-free tanh layer,
    dropout on and off, batch 3 and odd widths; output, input gradient, parameter
    gradients, running statistics and dropout streams, bit for bit. On the cpu
    backend the chain is one C++ call per direction."""
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            fastgan.nn.LinearBNAct(5, 7, momentum=None, dropout=0.2),
            fastgan.nn.LinearAct(7, 3, bias=False, activation="tanh", dropout=0.1),
            fastgan.nn.LinearBNAct(3, 4, dropout=0.0))
        fastgan.nn.seed_dropout(net, 7)
        return net.train(train)
    ref, net = build(), build()
    x = torch.randn(3, 5)
    g = torch.randn(3, 4)
    with fused_path("fused"), ran(name, "chain_forward" if name == "cpu" else
                                  "linear_bn_act_forward"):
        xr = x.clone().requires_grad_()
        y_ref = ref(xr)
        y_ref.backward(g)
        chain = T.Chain.of(net)
        assert chain is not None and chain.ready()
        with torch.no_grad():
            y, tape = chain.forward(x)
            dx = chain.backward(tape, g, dx=True)
    assert torch.equal(y, y_ref) and torch.equal(dx, xr.grad)
    for (k, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(ref.named_parameters(), net.parameters()):
        assert torch.equal(a.grad, b.grad), k
    for a, b in zip(fastgan.nn.layers._fused_layers(ref), fastgan.nn.layers._fused_layers(net)):
        assert torch.equal(a.dropout_rng, b.dropout_rng)


def test_bad_input_gets_the_ops_error_taped_or_not():
    """A real batch of the wrong width: the same one-line error from the op's check
    whether the step is taped or not."""
    errors = []
    for tape in (True, False):
        step = _step(*_models(), tape=tape)
        with pytest.raises(ValueError) as e:
            step(torch.zeros(B_, IMG + 2))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert errors[0] == f"real: expected {IMG} values per sample (the discriminator's in_dim), " \
        f"got shape ({B_}, {IMG + 2})"

"""``FusedAdam`` (fastgan.train.adam): bit-identical to ``torch.optim.Adam(fused=True)``
on its lean path and on every path it hands to torch's step; tests prove which ran."""
import copy

import pytest
import torch

from fastgan.train import make_adam
from fastgan.train.adam import FusedAdam


def _model(seed=0):
    torch.manual_seed(seed)
    # odd widths: the fused kernel's vector tails; a bias-free layer: two dtypes of shape
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.LeakyReLU(0.2),
                               torch.nn.Linear(33, 5, bias=False), torch.nn.Linear(5, 1))


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(3, 7, generator=g)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


class _Count:
    """Counts FusedAdam's hand-offs to torch's own step."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = FusedAdam._torch_step

        def counted(opt, *args, **kwargs):
            self.n += 1
            return real(opt, *args, **kwargs)
        monkeypatch.setattr(FusedAdam, "_torch_step", counted)


def _run_pair(kw, steps=6, edit=None):
    """The same model trained by torch's fused Adam and by FusedAdam."""
    a, b = _model(), _model()
    oa = torch.optim.Adam(a.parameters(), fused=True, **kw)
    ob = FusedAdam(b.parameters(), **kw)
    for s in range(steps):
        for m, o in ((a, oa), (b, ob)):
            _grads(m, s)
            if edit is not None:
                edit(m, o, s)
            o.step()
    return a, oa, b, ob


def _same(a, oa, b, ob):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=2e-4, betas=(0.5, 0.999)),
                                dict(lr=3e-3, betas=(0.0, 0.9), eps=1e-6, weight_decay=0.01)])
def test_lean_step_is_torch_fused_adam_bit_for_bit(monkeypatch, kw):
    count = _Count(monkeypatch)
    _same(*_run_pair(kw))
    assert count.n == 1   # the first step (torch creates the state); then the lean path only


@pytest.mark.parametrize("native", [True, False], ids=["cpu-backend-call", "torch-calls"])
def test_lean_step_runs_native_call_or_torch_calls_bit_for_bit(monkeypatch, native):
    # With the cpu backend built, the lean step is one call (step counts and
    # _fused_adam_, fastgan.impl.cpu.fused_adam_); without it, torch's two calls.
    from fastgan.ops import dispatch
    if native and "cpu" not in dispatch.backends():
        pytest.skip("the cpu backend is not built")
    calls = []
    key = ("cpu", "fused_adam_")
    if native:
        real = dispatch.module("cpu").fused_adam_
        monkeypatch.setitem(dispatch._OPTIONAL, key, lambda *a: (calls.append(1), real(*a)))
    else:
        monkeypatch.setitem(dispatch._OPTIONAL, key, None)
    count = _Count(monkeypatch)
    _same(*_run_pair(dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.01), steps=5))
    assert count.n == 1 and len(calls) == (4 if native else 0)


def test_native_call_refuses_steps_it_cannot_count():
    from fastgan.ops import dispatch
    if "cpu" not in dispatch.backends():
        pytest.skip("the cpu backend is not built")
    p, g = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="step 0 must be a float32 CPU scalar"):
        dispatch.module("cpu").fused_adam_([p], [g], [torch.zeros(3)], [torch.zeros(3)],
                                           [torch.tensor(1.0, dtype=torch.float64)], 1e-3, 0.9,
                                           0.999, 0.0, 1e-8, False)


def test_lr_schedule_edits_are_followed(monkeypatch):
    count = _Count(monkeypatch)

    def halve(m, o, s):
        for g in o.param_groups:
            g["lr"] = g["lr"] * 0.5
    _same(*_run_pair(dict(lr=1e-2), edit=halve))
    assert count.n == 1


def test_hooks_closure_profiler_and_frozen_params_take_torch_step(monkeypatch):
    count = _Count(monkeypatch)
    seen = []

    def edit(m, o, s):
        if s == 1:
            m[0].bias.grad = None              # a parameter without a gradient: skipped
        if s == 2 and isinstance(o, FusedAdam):
            o.register_step_pre_hook(lambda *a: seen.append("pre"))
            o.register_step_post_hook(lambda *a: seen.append("post"))
    a, oa, b, ob = _run_pair(dict(lr=1e-2), steps=5, edit=edit)
    _same(a, oa, b, ob)
    assert count.n == 1 + 1 + 3   # the first step, the one with a missing grad, the hooked ones
    assert seen == ["pre", "post"] * 3
    # a closure and a running profiler: torch's step as well, same numbers
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    oa2 = torch.optim.Adam(a2.parameters(), lr=1e-2, fused=True)
    ob2 = FusedAdam(b2.parameters(), lr=1e-2)
    oa2.load_state_dict(copy.deepcopy(oa.state_dict()))
    ob2.load_state_dict(copy.deepcopy(ob.state_dict()))
    before = count.n
    for m, o in ((a2, oa2), (b2, ob2)):
        _grads(m, 9)
        o.step(lambda: None)
        with torch.profiler.profile():
            _grads(m, 10)
            o.step()
    _same(a2, oa2, b2, ob2)
    assert count.n == before + 2


def test_amsgrad_and_capturable_groups_take_torch_step(monkeypatch):
    count = _Count(monkeypatch)
    _same(*_run_pair(dict(lr=1e-2, amsgrad=True), steps=3))
    assert count.n == 3


def test_state_dict_moves_between_torch_adam_and_fused_adam():
    a, oa, b, ob = _run_pair(dict(lr=1e-2), steps=3)
    c, d = _model(), _model()
    oc = FusedAdam(c.parameters(), lr=1e-2)
    od = torch.optim.Adam(d.parameters(), lr=1e-2, fused=True)
    c.load_state_dict(a.state_dict())
    # (copies, as a checkpoint holds: a loaded state_dict shares the tensors)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))   # torch's state into FusedAdam
    d.load_state_dict(b.state_dict())
    od.load_state_dict(copy.deepcopy(ob.state_dict()))   # and back
    for s in range(3, 6):
        for m, o in ((a, oa), (c, oc), (d, od)):
            _grads(m, s)
            o.step()
    _same(a, oa, c, oc)
    _same(a, oa, d, od)
    assert isinstance(oc, torch.optim.Adam)


def test_make_adam_gives_fused_adam_for_fp32_and_torch_adam_unfused():
    m = _model()
    opt = make_adam(m.parameters(), device="cpu")
    assert type(opt) is FusedAdam and opt.param_groups[0]["fused"]
    assert type(make_adam(m.parameters(), device="cpu", fused=False)) is torch.optim.Adam


def test_zero_grad_sets_every_gradient_to_none_and_keeps_torch_semantics():
    """The lean zero_grad (no profiler range) clears exactly what torch's does;
    set_to_none=False and a running profiler take torch's own."""
    m = _model()
    opt = FusedAdam(m.parameters())
    _grads(m, 0)
    next(m.parameters()).grad = None     # one already cleared: left as it is
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    _grads(m, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    _grads(m, 2)
    with torch.profiler.profile() as prof:
        opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert any("zero_grad" in e.name for e in prof.events())   # torch's own, with its range

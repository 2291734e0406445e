"""The cpu backend's ops with their autograd in C++ (csrc/cpu/autograd.cpp).

For plain eager CPU tensors the ops' ``call`` / ``call_grad`` / ``call_no_grad``
(and so ``fastgan.functional`` and the fused layers) hand the checked arguments
to ``fastgan.impl.cpu.linear_act`` / ``linear_bn_act``: the forward kernel and a
C++ autograd node, in one call. These tests hold that path to the Python
autograd Function it replaces (``<Op>Function.apply``, which runs the same
kernels): the same bits forward, backward and double backward, on odd shapes,
with and without dropout, bias and BatchNorm, train and eval, fp32 and bf16;
and autograd's contracts (frozen inputs, saved tensors modified in place, a
second backward, hooks, errors from the double backward). Each test proves
which path ran: the node's name, and the C++ backward kernel runs counted in
``dispatch.calls``.
"""
import pytest
import torch

import fastgan
from fastgan.impl import cpu
from fastgan.ops import dispatch
from fastgan.ops.registry import LinearActFunction, LinearBNActFunction

if "cpu" not in fastgan.backends():
    pytest.skip(f"cpu backend unavailable: {dispatch.unavailable().get('cpu')}",
                allow_module_level=True)

NODE = {LinearActFunction: "fastgan::cpu::LinearActFunction",
        LinearBNActFunction: "fastgan::cpu::LinearBNActFunction"}
BACKWARD = {LinearActFunction: "linear_act_backward",
            LinearBNActFunction: "linear_bn_act_backward"}


def _inputs(fn, batch, k, n, dtype, bias=True, p=0.0, training=True, activation="leaky_relu",
            seed=0):
    """Fresh leaf tensors of one op call, and the call's other arguments."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_() if bias else None
    key = (torch.tensor(2**40 + 5), torch.tensor(17))
    if fn is LinearActFunction:
        return [x, w, b], [activation, 0.2, p, *key]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (1 + 0.2 * torch.randn(n, generator=g)).to(stat).requires_grad_()
    beta = (0.2 * torch.randn(n, generator=g)).to(stat).requires_grad_()
    stats = [0.1 * torch.randn(n, generator=g).to(stat), 0.5 + torch.rand(n, generator=g).to(stat),
             torch.zeros(1, dtype=torch.int64)]
    return [x, w, b, gamma, beta], [*stats, training, 0.1, 1e-5, activation, 0.2, p, *key]


def _args(fn, leaves, rest):
    """The op's argument list from its leaves and other arguments (statistics copied,
    so two calls start from the same ones)."""
    if fn is LinearActFunction:
        return (*leaves, *rest)
    stats = [t.clone() for t in rest[:3]]
    return (*leaves, *stats, *rest[3:])


def _twin(leaves):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
            for t in leaves]


def _grads(y, leaves, seed=3):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(gy)
    return [None if t is None else t.grad for t in leaves]


def _same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


SHAPES = [(1, 5, 3), (2, 7, 33), (3, 19, 17), (16, 64, 130)]


# linear_act has no train/eval mode; batch statistics need two rows (the op refuses one)
KINDS = [(LinearActFunction, True), (LinearBNActFunction, True), (LinearBNActFunction, False)]
CASES = [pytest.param(fn, training, *shape, id=f"{fn.__name__}-{'train' if training else 'eval'}-"
                      f"{'x'.join(map(str, shape))}")
         for fn, training in KINDS for shape in SHAPES
         if not (fn is LinearBNActFunction and training and shape[0] == 1)]


@pytest.mark.parametrize("fn,training,batch,k,n", CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_node_matches_the_python_function(fn, training, batch, k, n, p, dtype):
    """Forward, every gradient and the updated statistics, bit for bit."""
    leaves, rest = _inputs(fn, batch, k, n, dtype, p=p, training=training)
    twin = _twin(leaves)
    args_native, args_python = _args(fn, leaves, rest), _args(fn, twin, rest)
    before = dispatch.calls[("cpu", BACKWARD[fn])]
    y = fn.call(*args_native)
    assert NODE[fn] in y.grad_fn.name()
    want = fn.apply(*args_python)
    assert "CppNode" not in want.grad_fn.name()   # the Python Function
    _same(y, want)
    for a, b in zip(_grads(y, leaves), _grads(want, twin)):
        _same(a, b)
    # the node's backward kernel run is counted as the Function's is
    assert dispatch.calls[("cpu", BACKWARD[fn])] == before + 2
    if fn is LinearBNActFunction:
        for a, b in zip(args_native[5:8], args_python[5:8]):
            _same(a, b)


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "all but x"])
def test_inputs_without_gradients(fn, frozen):
    """Inputs that need no gradient get none (and the kernels are asked for none:
    compute_dx / compute_dw); no bias at all is fine too."""
    leaves, rest = _inputs(fn, 4, 6, 5, torch.float32, bias=frozen != "bias", p=0.2)
    index = {"x": [0], "weight": [1], "bias": [], "all but x": list(range(1, len(leaves)))}
    for i in index[frozen]:
        if leaves[i] is not None:
            leaves[i].requires_grad_(False)
    twin = _twin(leaves)
    y, want = fn.call(*_args(fn, leaves, rest)), fn.apply(*_args(fn, twin, rest))
    assert NODE[fn] in y.grad_fn.name()
    for a, b in zip(_grads(y, leaves), _grads(want, twin)):
        _same(a, b)


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
def test_no_node_without_grad(fn):
    """Under no_grad, or with no input needing a gradient, the forward runs alone."""
    leaves, rest = _inputs(fn, 3, 4, 5, torch.float32)
    with torch.no_grad():
        y = fn.call(*_args(fn, leaves, rest))
    assert y.grad_fn is None and not y.requires_grad
    plain = [None if t is None else t.detach() for t in leaves]
    y2 = fn.call_no_grad(*_args(fn, plain, rest))
    assert y2.grad_fn is None
    _same(y, y2)


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_double_backward_matches_the_python_function(fn, p):
    """create_graph=True: the node calls the op's differentiable formulas (Python),
    so a gradient penalty's second derivatives equal the Function's."""
    results = []
    for call in (fn.call, fn.apply):
        leaves, rest = _inputs(fn, 5, 4, 3, torch.float32, p=p)
        y = call(*_args(fn, leaves, rest))
        (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
        gx.square().sum().backward()
        results.append([gx.detach()] + [None if t is None else t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
def test_gradgradcheck_through_the_node(fn):
    leaves, rest = _inputs(fn, 4, 3, 2, torch.float64, p=0.3, activation="tanh")
    if fn is LinearBNActFunction:
        def f(*t):
            return fn.call(*t, *[s.clone() for s in rest[:3]], *rest[3:])
    else:
        def f(*t):
            return fn.call(*t, *rest)
    y = f(*leaves)
    assert NODE[fn] in y.grad_fn.name()
    assert torch.autograd.gradcheck(f, tuple(leaves))
    assert torch.autograd.gradgradcheck(f, tuple(leaves))


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
def test_autograd_contracts(fn):
    """A saved input modified in place, a second backward and hooks behave as for
    any autograd node."""
    leaves, rest = _inputs(fn, 4, 6, 5, torch.float32)
    y = fn.call(*_args(fn, leaves, rest))
    with torch.no_grad():
        leaves[1].mul_(2)   # the weight is saved for backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    leaves, rest = _inputs(fn, 4, 6, 5, torch.float32)
    y = fn.call(*_args(fn, leaves, rest))
    seen = []
    y.register_hook(lambda g: seen.append(g.shape))
    leaves[1].register_hook(lambda g: seen.append("w"))
    y.sum().backward()
    assert seen == [y.shape, "w"]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_errors_in_the_double_backward_reach_the_caller(monkeypatch):
    """An exception raised by the Python double backward comes out of autograd.grad
    with its type and message."""
    from fastgan.ops import registry

    def broken(*args, **kwargs):
        raise ValueError("double backward failed on purpose")

    monkeypatch.setattr(registry._reference(), "linear_act_grads", broken)
    leaves, rest = _inputs(LinearActFunction, 3, 4, 2, torch.float32)
    y = LinearActFunction.call(*_args(LinearActFunction, leaves, rest))
    with pytest.raises(ValueError, match="double backward failed on purpose"):
        torch.autograd.grad(y.sum(), leaves[0], create_graph=True)


def test_entries_name_a_wrong_argument_type():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    key = (torch.tensor(0), torch.tensor(0))
    with pytest.raises(TypeError, match="weight must be a Tensor, got list"):
        fastgan._C.cpu_linear_act(x, [1.0], None, 0, 0.2, 0.0, *key)
    with pytest.raises(TypeError, match="p must be a float, got str"):
        fastgan._C.cpu_linear_act(x, w, None, 0, 0.2, "0", *key)
    with pytest.raises(TypeError, match="cpu_linear_act takes 8 arguments, got 2"):
        fastgan._C.cpu_linear_act(x, w)
    with pytest.raises(TypeError, match="training must be a bool, got int"):
        cpu.linear_bn_act(x, w, None, torch.ones(4), torch.zeros(4), torch.zeros(4),
                          torch.ones(4), torch.zeros(1, dtype=torch.int64), 1, 0.1, 1e-5,
                          "relu", 0.0, 0.0, *key)


def test_forced_backends_keep_the_python_function():
    """use_backend("reference") on CPU tensors runs the reference through the Python
    Function: only the cpu backend has the C++ nodes."""
    leaves, rest = _inputs(LinearActFunction, 3, 4, 2, torch.float32)
    with dispatch.use_backend("reference"):
        y = LinearActFunction.call(*_args(LinearActFunction, leaves, rest))
    assert "CppNode" not in y.grad_fn.name()


@pytest.mark.parametrize("fn", [LinearActFunction, LinearBNActFunction])
def test_saved_tensor_hooks_and_activation_checkpointing(fn):
    """The node's saved tensors go through saved-tensor hooks (offloading, non-reentrant
    torch.utils.checkpoint) as any node's do: the same gradients, every hook called."""
    import torch.utils.checkpoint as ckpt

    leaves, rest = _inputs(fn, 6, 5, 4, torch.float32, p=0.25)
    want = _grads(fn.call(*_args(fn, leaves, rest)), leaves)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    for run in ("hooks", "checkpoint"):
        twin = _twin(leaves)
        if run == "hooks":
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = fn.call(*_args(fn, twin, rest))
            assert NODE[fn] in y.grad_fn.name() and packed
        else:
            y = ckpt.checkpoint(lambda *t: fn.call(*t), *_args(fn, twin, rest),
                                use_reentrant=False)
        for a, b in zip(_grads(y, twin), want):
            _same(a, b)


def test_two_threads_train_at_once():
    """The entries release the GIL around the kernels, and the double backward takes it
    again: two threads running forward, backward and double backward at once get what
    each gets alone."""
    import threading

    def work(seed, out):
        leaves, rest = _inputs(LinearActFunction, 8, 6, 5, torch.float32, p=0.2, seed=seed)
        for _ in range(20):
            y = LinearActFunction.call(*_args(LinearActFunction, leaves, rest))
            (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
            gx.sum().backward()
        out[seed] = [t.grad.clone() for t in leaves]

    alone, together = {}, {}
    for s in (1, 2):
        work(s, alone)
    threads = [threading.Thread(target=work, args=(s, together)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (1, 2):
        for a, b in zip(alone[s], together[s]):
            _same(a, b)

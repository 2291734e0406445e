"""fastgan.fuse / fastgan.unfuse: the model's tree stays as it is and only how its
runs execute changes. Checked against an untouched copy of the model on every
CPU backend (and, marked ``gpu``, on CUDA). The tests fuse with
``only_if_faster=False`` where they check the kernels; the speed rule itself
is checked in test_dropin_speed_rule.py."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import backend
from fastgan.fuse import fuse, unfuse
from fastgan.nn import LinearAct, LinearBNAct, _Fused

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
GPU_BACKENDS = [b for b in ("triton", "cuda") if b in fastgan.backends()]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ALL = dict(only_if_faster=False)   # fuse every run the kernels take


# ----------------------------------------------------------------------------- models
class BlockGenerator(nn.Module):
    """The PyTorch-GAN style generator: a flat Sequential of *block(...) lists,
    BatchNorm1d(out, 0.8) (eps = 0.8), inplace LeakyReLU, a Linear -> Tanh head."""

    def __init__(self, latent_dim=7, img_shape=(1, 3, 5), dropout=0.0, momentum=0.1):
        super().__init__()
        self.img_shape = img_shape

        def block(in_feat, out_feat, normalize=True):
            layers = [nn.Linear(in_feat, out_feat)]
            if normalize:
                layers.append(nn.BatchNorm1d(out_feat, 0.8, momentum=momentum))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
            return layers

        self.model = nn.Sequential(*block(latent_dim, 17, normalize=False), *block(17, 33),
                                   *block(33, 19), nn.Linear(19, 15), nn.Tanh())

    def forward(self, z):
        img = self.model(z)
        return img.view(img.size(0), *self.img_shape)


class FunctionalDiscriminator(nn.Module):
    """Activations and dropout called in forward, a BN in the middle, a raw logit."""

    def __init__(self, in_dim=15, dropout=0.3):
        super().__init__()
        self.p = dropout
        self.fc1 = nn.Linear(in_dim, 21)
        self.fc2 = nn.Linear(21, 13)
        self.bn2 = nn.BatchNorm1d(13, momentum=None)
        self.fc3 = nn.Linear(13, 9)
        self.out = nn.Linear(9, 1)

    def forward(self, img):
        x = img.view(img.size(0), -1)
        x = F.dropout(F.leaky_relu(self.fc1(x), 0.2), self.p, training=self.training)
        x = F.relu(self.bn2(self.fc2(x)))
        x = torch.tanh(self.fc3(x))
        x = F.dropout(x, p=self.p, training=self.training)
        return self.out(x)


def mixed_model(dropout=0.0):
    """Fusable runs around layers the kernels do not support."""
    return nn.Sequential(
        nn.Linear(6, 11), nn.BatchNorm1d(11), nn.LeakyReLU(0.1),            # fused
        nn.Linear(11, 10), nn.ELU(),                                         # ELU: not fusable
        nn.Linear(10, 9), nn.BatchNorm1d(9, affine=False), nn.ReLU(),        # affine=False
        nn.Linear(9, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
        nn.Linear(8, 7), nn.LeakyReLU(-0.1),                                 # slope < 0
        nn.Linear(7, 5), nn.ReLU(inplace=True), nn.Dropout(dropout),        # fused
    )


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.leaky_relu(self.fc(x), 0.2)
        if h.sum() > 0:
            h = h * 2
        return h


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return h * 2 if self.training else h


MODELS = {  # name -> (constructor taking dropout, input width)
    "block_generator": (lambda p: BlockGenerator(dropout=p), 7),
    "functional_discriminator": (lambda p: FunctionalDiscriminator(dropout=p), 15),
    "mixed": (mixed_model, 6),
    "seed_generator": (lambda p: fastgan.models.Generator(7, (9, 11), 13, dropout=p,
                                                          fused=False), 7),
    "seed_discriminator": (lambda p: fastgan.models.Discriminator(13, (11, 6), dropout=p,
                                                                  fused=False), 13),
}


def build(name, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    make, width = MODELS[name]
    return make(dropout), width


def op_calls():
    return sum(n for (_, f), n in backend.calls.items() if f.endswith("_forward")
               and not f.startswith("gan_bce"))


def planned(model):
    return [m for m in model.modules() if "_fastgan_plan" in m.__dict__]


# ----------------------------------------------------------------------------- report
def test_report_block_generator():
    model, report = fuse(BlockGenerator(), **ALL)
    assert [r.op for r in report.fused] == ["linear_act", "linear_bn_act", "linear_bn_act",
                                            "linear_act"]
    assert report.left_alone == [] and report.unfused == []
    assert report.fused[1].layers == ("model.2 (Linear)", "model.3 (BatchNorm1d)",
                                      "model.4 (LeakyReLU)")
    text = str(report)
    assert "eps=0.8" in text and "model.2 (Linear) -> model.3 (BatchNorm1d)" in text
    assert "4 run(s) fused" in text


def test_report_mixed_model_names_every_module_and_why():
    model, report = fuse(mixed_model(0.25), **ALL)
    assert [r.path for r in report.fused] == ["0", "13"]
    reasons = {a.path: a.reason for a in report.left_alone}
    assert "followed by 4 (ELU)" in reasons["3"] and "ELU is not a fused activation" in reasons["3"]
    assert "affine=False" in reasons["5"] and "affine=False" in reasons["6"]
    assert "track_running_stats=False" in reasons["8"]
    assert "negative_slope=-0.1" in reasons["11"] and "negative_slope=-0.1" in reasons["12"]
    assert reasons["7"] == "not part of a fusable Linear run"
    # Every module that is in no fused run has its line, in model order.
    assert [a.path for a in report.left_alone] == [str(i) for i in range(3, 13)]
    assert "2 run(s) fused" in str(report)
    assert type(model[3]) is nn.Linear and type(model[4]) is nn.ELU and len(model) == 16


def test_report_functional_discriminator():
    orig = FunctionalDiscriminator(dropout=0.3)
    model, report = fuse(orig, **ALL)
    runs = {r.path: (r.op, r.detail) for r in report.fused}
    assert runs["fc1"] == ("linear_act", "leaky_relu(0.2), dropout=0.3")
    assert runs["fc2"] == ("linear_bn_act", "eps=1e-05, momentum=None, relu")
    assert runs["fc3"] == ("linear_act", "tanh, dropout=0.3")
    assert report.fused[0].layers == ("fc1 (Linear)", "F.leaky_relu()", "F.dropout()")
    assert [(a.path, a.kind) for a in report.left_alone] == [("out", "Linear")]
    assert "its output is" not in str(report) and "bare Linear" in report.left_alone[0].reason
    assert model is orig and isinstance(model, FunctionalDiscriminator) and model.p == 0.3
    assert type(model).__name__ == "FunctionalDiscriminator" and type(model.fc2) is nn.Linear


def test_untraceable_left_alone_and_working():
    torch.manual_seed(0)
    orig = Untraceable()
    model, report = fuse(copy.deepcopy(orig), **ALL)
    assert type(model) is Untraceable and not planned(model)
    assert "torch.fx cannot trace" in report.left_alone[0].reason
    assert report.left_alone[1].path == "fc" and "runs as written" in report.left_alone[1].reason
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), orig(x), rtol=0, atol=0)


def test_mode_dependent_forward_left_alone():
    model, report = fuse(ModeDependent(), **ALL)
    assert type(model) is ModeDependent and not planned(model)
    assert "self.training" in report.left_alone[0].reason


def test_always_on_functional_dropout_is_fused_as_written():
    """``F.dropout(h, 0.5)`` drops in eval too (training defaults to True); the
    fused run does what the code says."""
    class AlwaysDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 64)

        def forward(self, x):
            return F.dropout(F.relu(self.fc(x)), 0.5)

    model, report = fuse(AlwaysDrop().eval(), **ALL)
    assert report.fused[0].detail == "relu, dropout=0.5 (also in eval, as written)"
    before = op_calls()
    with fastgan.use_backend("reference"):
        x = torch.randn(32, 4)
        y = model(x)
    assert op_calls() == before + 1
    dense = F.relu(model.fc(x))
    alive = dense > 0
    assert 0.3 < (y[alive] == 0).float().mean() < 0.7   # still drops, in eval, as written


def test_mode_following_dropout_outside_a_run_still_follows_the_mode():
    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 64)

        def forward(self, x):
            h = F.leaky_relu(self.fc(x), 0.2)
            return F.dropout(h, 0.5, self.training) * 2   # the run ends before the dropout

    model, _ = fuse(Between(), **ALL)
    x = torch.randn(32, 4)
    with fastgan.use_backend("reference"):
        assert (model.train()(x) == 0).any()
        y = model.eval()(x)
    torch.testing.assert_close(y, 2 * F.leaky_relu(model.fc(x), 0.2))


def test_sequential_subclass_with_its_own_forward():
    class Scaled(nn.Sequential):
        def forward(self, x):
            for m in self:
                x = m(x)
            return x * 0.5

    torch.manual_seed(0)
    orig = Scaled(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    ref = copy.deepcopy(orig)
    model, report = fuse(orig, **ALL)
    assert model is orig and isinstance(model, Scaled) and [r.op for r in report.fused] == \
        ["linear_bn_act"]
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 4)
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    assert repr(unfuse(model)) == repr(ref) and type(model) is Scaled


def test_a_module_used_twice_fuses_at_both_places():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    orig = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU())
    ref = copy.deepcopy(orig)
    model, report = fuse(orig, **ALL)
    assert len(report.fused) == 2
    x = torch.randn(3, 5)
    with fastgan.use_backend("reference"):
        model(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref[0].weight.grad)
    block = nn.Sequential(nn.Linear(5, 5), nn.ReLU())    # a container used twice: planned once
    model, report = fuse(nn.Sequential(block, block), **ALL)
    assert [r.path for r in report.fused] == ["0.0"]
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model(x), F.relu(block[0](F.relu(block[0](x)))))


def test_already_fused_layers_left_alone():
    model, report = fuse(nn.Sequential(LinearAct(3, 4)), **ALL)
    assert not report.fused and "already a fused layer" in report.left_alone[0].reason


def test_bf16_batchnorm_runs_unfused_and_says_why():
    orig = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()).bfloat16()
    model, report = fuse(orig, **ALL)
    assert "statistics in torch.float32" in report.unfused[0].reason
    before = op_calls()
    model(torch.randn(3, 4, dtype=torch.bfloat16))
    assert op_calls() == before


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse(lambda x: x)
    with pytest.raises(ValueError, match="copy=True contradicts inplace=True"):
        fuse(nn.Linear(2, 2), inplace=True, copy=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unfuse(3)


# ----------------------------------------------------------------------------- the tree stays
def tree(model):
    """Everything about the tree a user's code can see."""
    return ([(n, type(m).__name__, repr(m)) for n, m in model.named_modules()],
            [(n, id(p)) for n, p in model.named_parameters()],
            [(n, id(b)) for n, b in model.named_buffers()],
            list(model.state_dict()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tree_names_parameters_and_keys_unchanged(name):
    orig, _ = build(name, 0.2)
    before = tree(orig)
    classes = {n: type(m) for n, m in orig.named_modules()}
    state = {k: v.clone() for k, v in orig.state_dict().items()}
    model, report = fuse(orig, **ALL)
    assert model is orig and report.fused
    assert tree(model) == before
    for path, m in model.named_modules():
        assert model.get_submodule(path) is m and isinstance(m, classes[path])
        if isinstance(m, nn.Sequential):
            assert [type(c) for c in m] == [type(c) for c in orig.get_submodule(path)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # The original's checkpoint loads into the fused model and back, strictly.
    other, _ = build(name, 0.2, seed=1)
    fuse(other, **ALL)
    other.load_state_dict(state, strict=True)
    orig.load_state_dict(other.state_dict(), strict=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_copy_leaves_the_original_alone(name):
    orig, width = build(name, 0.2)
    before = {k: v.clone() for k, v in orig.state_dict().items()}
    model, _ = fuse(orig, copy=True, **ALL)
    assert model is not orig and planned(model) and not planned(orig)
    ptrs = {t.data_ptr() for t in orig.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    with fastgan.use_backend("reference"):
        model(torch.randn(5, width)).sum().backward()
    for k, v in orig.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in orig.parameters())


def test_inplace_is_the_old_spelling():
    orig = BlockGenerator()
    linear = orig.model[2]
    model, _ = fuse(orig, inplace=True)
    assert model is orig and model.model[2] is linear
    copied, _ = fuse(orig, inplace=False)
    assert copied is not orig and copied.model[2] is not linear
    assert fuse(orig, inplace=False, copy=True)[0] is not orig


def test_fusing_again_replans():
    model, first = fuse(BlockGenerator(), **ALL)
    cls = type(model.model)
    model, again = fuse(model, **ALL)
    assert type(model.model) is cls and [str(r) for r in again.runs] == \
        [str(r) for r in first.runs]


def test_deepcopy_and_pickle_keep_the_plan():
    orig = FunctionalDiscriminator()
    model, _ = fuse(copy.deepcopy(orig), **ALL)
    for m in (copy.deepcopy(model), _roundtrip(model)):
        assert type(m) is type(model) and m.p == 0.3 and planned(m)
        assert m.__dict__["_fastgan_plan"] is not model.__dict__["_fastgan_plan"]
        assert list(m.state_dict()) == list(orig.state_dict())
        m.load_state_dict(orig.state_dict())
        before = op_calls()
        with fastgan.use_backend("reference"):
            torch.testing.assert_close(m.eval()(torch.ones(2, 15)), orig.eval()(torch.ones(2, 15)))
        assert op_calls() == before + 3
        assert type(unfuse(m)) is FunctionalDiscriminator
    gen, _ = fuse(BlockGenerator(), **ALL)
    back = _roundtrip(gen)
    assert list(back.state_dict()) == list(gen.state_dict()) and planned(back)


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_names_older_pickles_hold_still_resolve():
    """Fused models pickled by an older fastgan name these functions."""
    import pickle

    from fastgan.nn.fuse import legacy
    for module in ("fastgan.nn.fuse", "fastgan.fuse"):
        find = pickle.Unpickler(io.BytesIO()).find_class
        assert find(module, "_rebuild_fx") is legacy.rebuild_fx
        assert find(module, "_state_dict_hook") is legacy.state_dict_hook
        assert find(module, "_load_pre_hook") is legacy.load_pre_hook


def test_unfuse_undoes_the_old_layout():
    """A model the old fuse rewrote (fused layers in the tree, keys renamed by hooks)."""
    from fastgan.nn.fuse import legacy
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    old = copy.deepcopy(plain)
    layer = LinearAct.from_sequential(nn.Sequential(old[0], old[1]))
    setattr(layer, legacy.ORIGIN, ("0", "1"))
    old._modules = type(old._modules)([("0", layer), ("2", old[2])])
    old.register_state_dict_post_hook(legacy.state_dict_hook)
    old.register_load_state_dict_pre_hook(legacy.load_pre_hook)
    assert list(old.state_dict()) == list(plain.state_dict())
    back = unfuse(old)
    assert repr(back) == repr(plain) and not back._state_dict_hooks
    assert [type(m) for m in back] == [nn.Linear, nn.ReLU, nn.Linear]


class _CallsActivation(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.fc, self.call = nn.Linear(5, 4), call

    def forward(self, x):
        return self.call(self.fc(x))


def _activation_calls():
    """Every functional target and Tensor method of the activation table."""
    from fastgan.ops.spec import ACTIVATION_TABLE
    for row in ACTIVATION_TABLE:
        for fn in row.functions:
            yield pytest.param(row.name, fn, id=f"{row.name}-{fn.__module__}.{fn.__name__}")
        for method in row.methods:
            yield pytest.param(row.name, lambda t, m=method: getattr(t, m)(),
                               id=f"{row.name}-Tensor.{method}")


@pytest.mark.parametrize("name,call", list(_activation_calls()))
def test_fx_pass_fuses_every_activation_of_the_table(name, call):
    orig = _CallsActivation(call).eval()
    ref = copy.deepcopy(orig)
    model, report = fuse(orig, **ALL)
    assert [r.detail.split("(")[0] for r in report.fused] == [name], str(report)
    x = torch.randn(3, 5)
    before = op_calls()
    torch.testing.assert_close(model(x), ref(x))
    assert op_calls() == before + 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_double_before_or_after_fuse(when):
    orig = BlockGenerator(dropout=0.1).eval()
    if when == "before":
        orig.double()
    model, report = fuse(copy.deepcopy(orig), **ALL)
    if when == "after":
        model.double()
        orig.double()
    assert len(report.fused) == 4
    x = torch.randn(3, 7, dtype=torch.float64)
    before = op_calls()
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model(x), orig(x))
    assert op_calls() == before + 4


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_momentum_carried(momentum):
    _, report = fuse(BlockGenerator(momentum=momentum), **ALL)
    assert [r.detail.split(",")[1].strip() for r in report.fused if r.op == "linear_bn_act"] == \
        [f"momentum={momentum}"] * 2


# ----------------------------------------------------------------------------- equivalence
def _check_eval(name, backend_name, device="cpu", dtype=torch.float32):
    orig, width = build(name, dropout=0.3)
    # Non-trivial running statistics first (dropout off so both see the same).
    with torch.no_grad():
        for m in orig.modules():
            if isinstance(m, nn.BatchNorm1d) and m.track_running_stats:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    orig = orig.to(device).eval()
    model, _ = fuse(copy.deepcopy(orig), **ALL)
    backend.calls.clear()
    # (the mixed model's track_running_stats=False BN needs batch > 1 even in eval)
    for batch in ((2, 3, 8) if name == "mixed" else (1, 2, 3, 8)):
        x = torch.randn(batch, width, device=device, dtype=dtype)
        with fastgan.use_backend(backend_name):
            y = model(x)
        torch.testing.assert_close(y, orig(x), rtol=1e-5, atol=1e-5)
    assert backend.calls[(backend_name, "linear_act_forward")] + \
        backend.calls[(backend_name, "linear_bn_act_forward")] > 0


def _check_train(name, backend_name, device="cpu"):
    orig, width = build(name, dropout=0.0)
    orig = orig.to(device).train()
    model, _ = fuse(copy.deepcopy(orig), **ALL)
    backend.calls.clear()
    for _ in range(3):
        x = torch.randn(6, width, device=device)
        for m in (orig, model):
            m.zero_grad()
        with fastgan.use_backend(backend_name):
            y = model(x)
            y.square().sum().backward()
        y_ref = orig(x)
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        a, b = orig.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        for k in a:  # running stats, num_batches_tracked, weights and their gradients
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
            if isinstance(a[k], nn.Parameter):
                torch.testing.assert_close(b[k].grad, a[k].grad, rtol=1e-4, atol=1e-5, msg=k)
        with torch.no_grad():  # an optimizer step so the next one sees new weights
            for k in a:
                if isinstance(a[k], nn.Parameter):
                    a[k].sub_(0.1 * a[k].grad)
                    b[k].sub_(0.1 * b[k].grad)
    assert backend.calls[(backend_name, "linear_act_backward")] + \
        backend.calls[(backend_name, "linear_bn_act_backward")] > 0


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_outputs_equal(name, backend_name):
    _check_eval(name, backend_name)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_outputs_grads_running_stats_equal(name, backend_name):
    _check_train(name, backend_name)


def test_batched_leading_dims_take_the_fused_op():
    torch.manual_seed(0)
    orig = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
    ref = copy.deepcopy(orig)
    model, _ = fuse(orig, **ALL)
    x = torch.randn(2, 3, 6)
    before = op_calls()
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model(x), ref(x))
    assert op_calls() == before + 1


def test_dropout_active_in_fused_train_mode():
    orig = nn.Sequential(nn.Linear(6, 40), nn.Identity(), nn.Dropout(0.5))
    model, report = fuse(orig, **ALL)
    assert report.fused[0].detail == "identity, dropout=0.5"
    x = torch.randn(64, 6)
    with fastgan.use_backend("reference"):
        y = model(x)
    dense = model[0](x)
    kept = y != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(y[kept], 2 * dense[kept])


@pytest.mark.parametrize("act,homogeneous", [(nn.LeakyReLU(0.2), True), (nn.ReLU(), True),
                                             (nn.Tanh(), False)])
def test_dropout_then_activation(act, homogeneous):
    """cgan's Linear -> Dropout -> LeakyReLU: equal to LeakyReLU then Dropout for a
    positively homogeneous activation, so it fuses whole; a Tanh stays outside."""
    torch.manual_seed(0)
    orig = nn.Sequential(nn.Linear(6, 64), nn.Dropout(0.4), act)
    model, report = fuse(orig, **ALL)
    (run,) = report.fused
    assert len(run.layers) == (3 if homogeneous else 2)
    x = torch.randn(48, 6)
    with fastgan.use_backend("reference"):
        y = model(x)
    z = model[0](x)
    alive = act(z) != 0
    kept = alive & (y != 0)
    assert 0.25 < (y[alive] == 0).float().mean() < 0.55
    torch.testing.assert_close(y[kept], act(z / 0.6)[kept])   # act(mask * z)
    if not homogeneous:
        assert [r.path for r in report.left_alone] == ["2"]


def test_dropout_child_eval_alone_turns_fused_dropout_off():
    torch.manual_seed(0)
    model, _ = fuse(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5)), **ALL)
    model[2].eval()
    x = torch.randn(16, 6)
    before = op_calls()
    with fastgan.use_backend("reference"):
        y = model(x)
    assert op_calls() == before + 1
    torch.testing.assert_close(y, F.relu(model[0](x)))


# ----------------------------------------------------------------------------- edits after fuse
def test_replacing_a_child_takes_effect_with_a_warning():
    torch.manual_seed(0)
    model, _ = fuse(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), **ALL)
    model[2] = nn.Sigmoid()
    x = torch.randn(5, 4)
    with pytest.warns(RuntimeWarning, match=r"changed after fuse \(2 is now a Sigmoid"):
        y = model(x)
    torch.testing.assert_close(y, torch.sigmoid(model[1](model[0](x))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once
    model.append(nn.Tanh())
    model, report = fuse(model, **ALL)   # fusing again takes the edited model
    assert report.fused[0].layers == ("0 (Linear)", "1 (BatchNorm1d)")


def test_appending_takes_effect_with_a_warning():
    model, _ = fuse(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), **ALL)
    model.append(nn.Tanh())
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="added, removed or renamed"):
        y = model(x)
    torch.testing.assert_close(y, torch.tanh(F.relu(model[0](x))))


def test_replacing_with_the_same_kind_keeps_fusing_with_the_new_module():
    model, _ = fuse(nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.2)), **ALL)
    model[0] = nn.Linear(4, 6)
    model[1] = nn.LeakyReLU(0.5)
    x = torch.randn(3, 4)
    before = op_calls()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastgan.use_backend("reference"):
            y = model(x)
    assert op_calls() == before + 1
    torch.testing.assert_close(y, F.leaky_relu(model[0](x), 0.5))


def test_fx_module_attribute_change_runs_the_original_forward():
    torch.manual_seed(0)
    model, _ = fuse(FunctionalDiscriminator(dropout=0.3), **ALL)
    model.p = 0.0
    x = torch.randn(4, 15)
    with pytest.warns(RuntimeWarning, match="self.p is now 0.0, was 0.3"):
        y = model.train()(x)
    ref = copy.deepcopy(unfuse(copy.deepcopy(model)))
    torch.testing.assert_close(y, ref(x))   # p = 0: no randomness left


# ----------------------------------------------------------------------------- unfuse
@pytest.mark.parametrize("name", sorted(MODELS))
def test_unfuse_is_exact(name):
    orig, width = build(name, 0.2)
    orig.eval()
    ref = copy.deepcopy(orig)
    classes = [type(m) for m in orig.modules()]
    before = tree(orig)
    model, _ = fuse(orig, **ALL)
    plain = unfuse(model)
    assert plain is orig and [type(m) for m in plain.modules()] == classes
    assert not planned(plain) and tree(plain) == before
    x = torch.randn(4, width)
    before_calls = op_calls()
    torch.testing.assert_close(plain(x), ref(x), rtol=0, atol=0)
    assert op_calls() == before_calls


def test_unfuse_copy():
    model, _ = fuse(BlockGenerator(), **ALL)
    plain = unfuse(model, copy=True)
    assert plain is not model and planned(model) and not planned(plain)
    assert unfuse(model, inplace=False) is not model


def test_unfuse_directly_built_layers_gives_reference_layout():
    fused, plain = (fastgan.models.Generator(7, (9,), 5, fused=f) for f in (True, False))
    back = unfuse(fused)
    assert repr(back) == repr(plain)
    assert list(back.state_dict()) == list(plain.state_dict())
    assert not any(isinstance(m, _Fused) for m in back.modules())
    assert isinstance(unfuse(LinearBNAct(3, 4), copy=True), nn.Sequential)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_eval_and_train_equal(name, backend_name):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_eval(name, backend_name, device="cuda")
    _check_train(name, backend_name, device="cuda")


def test_runs_through_a_module_list_in_forward():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = F.leaky_relu(layer(x), 0.1)
            return x

    torch.manual_seed(0)
    orig = Stack()
    ref = copy.deepcopy(orig)
    model, report = fuse(orig, **ALL)
    assert [r.path for r in report.fused] == ["layers.0", "layers.1", "layers.2"]
    x = torch.randn(4, 6)
    before = op_calls()
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model(x), ref(x))
    assert op_calls() == before + 3
    model.layers[1] = nn.Conv1d(6, 6, 1)
    with pytest.warns(RuntimeWarning, match="layers.1 is now a Conv1d"):
        with pytest.raises(RuntimeError):   # the edit takes effect: a Conv1d on 2-D input
            model(x[None])


@pytest.mark.slow
def test_torch_compile_runs_the_fused_ops():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2),
                          nn.Linear(32, 8), nn.Tanh())
    model, _ = fuse(copy.deepcopy(plain), **ALL)
    compiled = torch.compile(model)
    x = torch.randn(8, 16)
    before = op_calls()
    with fastgan.use_backend(CPU_BACKENDS[-1]):
        y = compiled(x)
    assert op_calls() == before + 2
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert model[0].weight.grad is not None

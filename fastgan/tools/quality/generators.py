"""Generators to score: one rebuilt from a checkpoint, its images, its scores."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .judge import Judge
from .metrics import features_and_probs, scores


def generator_from_state(state: dict):
    """A plain-PyTorch Generator built from a state_dict's shapes, weights loaded.

    Accepts a generator ``state_dict`` or a training checkpoint (a dict with a
    ``generator`` entry, as ``fastgan.train.Trainer.state_dict`` writes)."""
    from ...nn.models import Generator

    if "generator" in state and isinstance(state["generator"], dict):
        state = state["generator"]
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
    G = Generator(latent_dim=latent, hidden=hidden, out_dim=out, fused=False)
    try:
        G.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint: generator weights do not fit the seed GAN: "
                         f"{str(e).splitlines()[0]}") from None
    return G.eval()


@torch.no_grad()
def generate(G: nn.Module, n: int, seed: int = 0, batch: int = 1000, device="cpu") -> Tensor:
    """``n`` images from ``G`` in eval mode (running BN stats, no dropout), on the CPU."""
    latent = getattr(G, "latent_dim", None) or next(m for m in G.modules()
                                                    if isinstance(m, nn.Linear)).in_features
    g = torch.Generator().manual_seed(seed)
    was = G.training
    G.eval()
    try:
        out = [G(torch.randn(min(batch, n - i), latent, generator=g).to(device)).float().cpu()
               for i in range(0, n, batch)]
    finally:
        G.train(was)
    return torch.cat(out).reshape(n, -1)


def evaluate_generator(G: nn.Module, judge: Judge, n: int = 2000, seed: int = 0,
                       device="cpu") -> dict:
    """Scores of ``n`` generated images against the held-out real images."""
    test_feats, _ = features_and_probs(judge.model, judge.test[0])
    return scores(judge.model, generate(G, n, seed, device=device), test_feats)

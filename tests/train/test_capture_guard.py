"""The train step's graph body under ``fastgan.train.graphs.capture_guard`` on
the CPU: nothing in it syncs the host, builds tensors from host data or draws
random numbers from a generator the graph does not register, for every
schedule and for K steps per graph. The guard itself is checked first: each
thing it forbids raises."""
from __future__ import annotations

import random

import pytest
import torch

from fastgan.ops import dispatch as backend
from fastgan.train import GANStep, ResidentBatches, TrainConfig, build_models, make_adam
from fastgan.train import config as train_config
from fastgan.train.graphs import GraphCaptureError, capture_guard
from helpers import require

# every schedule the engine knows (a new one is covered when it lands)
SCHEDULES = getattr(train_config, "SCHEDULES", ("alternating",))


@pytest.mark.parametrize("bad", [
    lambda t: t.sum().item(),
    lambda t: t.tolist(),
    lambda t: t.cpu(),
    lambda t: bool(t.sum() > 0),
    lambda t: float(t.sum()),
    lambda t: t.nonzero(),
    lambda t: torch.tensor([1.0, 2.0]),
    lambda t: torch.as_tensor([3.0]),
    lambda t: torch.randn(3),
    lambda t: torch.randn(3, generator=torch.Generator().manual_seed(0)),
    lambda t: t.uniform_(),
    lambda t: torch.nn.functional.dropout(t, 0.5),
    lambda t: torch.cuda.synchronize(),
    lambda t: random.random(),
], ids=["item", "tolist", "cpu", "bool", "float", "nonzero", "tensor", "as_tensor",
        "randn_default_rng", "randn_unregistered", "uniform_", "dropout", "cuda_synchronize",
        "python_random"])
def test_guard_refuses(bad):
    t = torch.ones(4)
    with pytest.raises(GraphCaptureError):
        with capture_guard():
            bad(t)


def test_guard_allows_capturable_work():
    gen = torch.Generator().manual_seed(0)
    t = torch.ones(4)
    with capture_guard(generators=(gen,)) as guard:
        u = torch.randn(4, generator=gen) + t * 2
        torch.nn.functional.dropout(u, 0.0)
        u.add_(torch.full_like(u, 0.5)).sum()
    assert guard.calls >= 4
    assert torch.cuda.synchronize is not None and random.random() < 1.0  # restored


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_graph_body_is_capturable(schedule, k, dropout):
    """What ``GANStep`` captures (``_body``: K steps on gathered batches) runs
    under the guard on the C++ CPU backend, with the noise generator the step
    registers with its graph; the step really ran (parameters moved)."""
    require("cpu", "cpu")
    cfg = TrainConfig(latent_dim=8, g_hidden=(16, 32), d_hidden=(32, 16), image_dim=12,
                      dropout=dropout)
    G, D = build_models(cfg)
    data = torch.rand(64, 12) * 2 - 1
    step = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()),
                   batches=ResidentBatches(data, 8, seed=1), batch_size=8, latent_dim=8,
                   seed=3, steps_per_call=k, schedule=schedule, graphs=False)
    step.batches.start_epoch(0)
    with backend.use_backend("cpu"):
        step()  # eager warm-up, as capture() does: optimizer state exists before
        before = [p.detach().clone() for p in G.parameters()]
        backend.calls.clear()
        with capture_guard(generators=(step.noise,)) as guard:
            out = step._body()
    assert guard.calls > 0
    assert backend.calls[("cpu", "gan_bce_forward")] >= k
    assert all(torch.isfinite(s) for s in out)
    assert any(not torch.equal(a, p) for a, p in zip(before, G.parameters()))


def test_read_means_is_outside_the_graph():
    """The one host sync of the engine (``read_means``) is refused under the
    guard: it must stay outside the captured step."""
    require("cpu", "cpu")
    cfg = TrainConfig(latent_dim=8, g_hidden=(16,), d_hidden=(16,), image_dim=12)
    G, D = build_models(cfg)
    step = GANStep(G, D, make_adam(G.parameters()), make_adam(D.parameters()), batch_size=4,
                   latent_dim=8, graphs=False)
    with pytest.raises(GraphCaptureError, match="syncs the host"):
        with capture_guard(generators=(step.noise,)):
            step.read_means()
